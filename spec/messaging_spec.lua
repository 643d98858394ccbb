-- rpc.connect against the real broker: the messaging primitives (declare, bind, publish,
-- consume, receive, ack/nack/reject, purge, delete), their failures and bad arguments, and
-- servers and clients through exchanges (server opts.bind, client opts.exchange).
-- Every call whose error is under test is made as a statement, never `return f(...)`: a tail
-- call would lose the function name that luaL_argerror reports.
local H = require "support.helpers"
local rpc = require "rpc"

local function all_bytes(times)
  local t = {}
  for i = 0, 255 do t[#t + 1] = string.char(i) end
  return string.rep(table.concat(t), times)
end

--- Asserts success (a first value that is not nil) and returns every value; on nil, message,
-- kind fails showing them.
local function ok(...)
  local v, message, kind = ...
  if v == nil then
    error(("expected success, got nil, %s, %s"):format(tostring(message), tostring(kind)), 2)
  end
  return ...
end

--- Asserts nil, message, kind with that kind (the message a string without the password);
-- returns the message.
local function fails(kind, v, message, got)
  if v ~= nil then error(("expected nil, message, %q; got %s"):format(kind, tostring(v)), 2) end
  assert.equal(kind, got, message)
  assert.is_string(message)
  H.assert_no_password(message)
  return message
end

--- Asserts that fn raises "bad argument #n to 'name'", mentioning each extra plain text.
local function assert_bad(n, name, fn, ...)
  local err = H.error_of(fn)
  assert.matches("bad argument #" .. n .. " to '" .. name .. "'", err, 1, true)
  for _, text in ipairs {...} do assert.matches(text, err, 1, true) end
  return err
end

--- A connection closed at the end of the test.
local function connect(T, opts)
  local conn, message, kind = rpc.connect(H.opts(opts))
  if not conn then error(("rpc.connect failed: %s (%s)"):format(message, kind), 2) end
  T:defer(function() conn:close() end)
  return conn
end

--- At the end of the test, fn(conn) on a fresh connection: deleting what the test made.
local function later(T, fn)
  T:defer(function()
    local conn = assert(rpc.connect(H.opts()))
    fn(conn)
    conn:close()
  end)
end

--- A fresh exchange name; the exchange is deleted at the end of the test.
local function exchange(T, what)
  local name = "spec-x-" .. (what and what .. "-" or "") .. H.hex(6)
  later(T, function(conn) conn:delete_exchange(name) end)
  return name
end

--- Ready messages and consumers of queue (a passive declare).
local function count(conn, queue)
  local _, messages, consumers = ok(conn:declare_queue(queue, {passive = true}))
  return messages, consumers
end

--- Waits until queue holds n ready messages.
local function wait_count(conn, queue, n)
  local last
  H.wait_until(function()
    last = count(conn, queue)
    return last == n
  end, 5, ("%d messages in %s (last seen: %s)"):format(n, queue, tostring(last)))
end

--- The next message, within 5 s.
local function receive(conn, timeout)
  return ok(conn:receive(timeout or 5))
end

--- Asserts that nothing comes within timeout seconds (default 0.3).
local function assert_nothing(conn, timeout)
  local msg, message, kind = conn:receive(timeout or 0.3)
  assert.is_nil(msg, msg and ("an unexpected message: %q"):format(msg.body))
  assert.equal("timeout", kind, message)
end

--- Consumes each queue (auto acks, consumer tag = queue name), receives n messages and checks
-- that no more come: the bodies each queue got, in order.
local function collect(conn, queues, n)
  local got = {}
  for _, queue in ipairs(queues) do
    got[queue] = {}
    assert.equal(queue, ok(conn:consume(queue, {ack = false, tag = queue})))
  end
  for _ = 1, n do
    local msg = receive(conn)
    table.insert(got[msg.consumer_tag], msg.body)
  end
  assert_nothing(conn, 0.2)
  return got
end

local function handler(body) return body end

describe("rpc.connect", function()
  teardown(H.cleanup)

  it("connects and prints itself without the password", function()
    local T = H.scope(finally)
    local conn = connect(T)
    local text = tostring(conn)
    assert.matches("^rpc%.connection %(amqp://", text)
    assert.matches(H.USER .. "@" .. H.HOSTPORT, text, 1, true)
    H.assert_no_password(text)
    assert.equal("userdata", type(conn))
  end)

  local env_it = os.getenv("RPC_URL") and os.getenv("RPC_URL") ~= "" and it or pending
  env_it("connects to env RPC_URL when opts has no url", function()
    local conn = ok(rpc.connect())
    assert.matches(H.HOSTPORT, tostring(conn), 1, true)
    conn:close()
  end)

  it("close is idempotent, and __close closes", function()
    local T = H.scope(finally)
    local conn = connect(T)
    conn:close()
    conn:close()
    assert.equal("rpc.connection (closed)", tostring(conn))
    local kept
    do
      local c <close> = ok(rpc.connect(H.opts()))
      kept = c
    end
    assert.equal("rpc.connection (closed)", tostring(kept))
  end)

  it("returns nil, message, 'closed' from every method on a closed connection", function()
    local T = H.scope(finally)
    local conn = connect(T)
    conn:close()
    local q = H.queue("closed")
    local calls = {
      declare_exchange = function() return conn:declare_exchange("spec-x-closed", "direct") end,
      declare_queue = function() return conn:declare_queue(q) end,
      bind = function() return conn:bind(q, "amq.direct", "k") end,
      unbind = function() return conn:unbind(q, "amq.direct", "k") end,
      publish = function() return conn:publish("", q, "x") end,
      consume = function() return conn:consume(q) end,
      cancel = function() return conn:cancel("tag") end,
      receive = function() return conn:receive(1) end,
      receive_forever = function() return conn:receive() end,
      ack = function() return conn:ack(1) end,
      nack = function() return conn:nack(1) end,
      reject = function() return conn:reject(1) end,
      purge = function() return conn:purge(q) end,
      delete_queue = function() return conn:delete_queue(q) end,
      delete_exchange = function() return conn:delete_exchange("spec-x-closed") end,
    }
    for name, call in pairs(calls) do
      local elapsed, v, message, kind = H.timed(call)
      assert.is_nil(v, name)
      assert.equal("closed", kind, name)
      assert.matches("closed", message, 1, true)
      assert.is_true(elapsed < 0.5, name .. " took " .. elapsed)
    end
    -- nothing was declared on the way
    assert.equal(404, H.amqp1 {op = "count", queue = q}.error)
  end)

  it("still raises for bad arguments on a closed connection", function()
    local T = H.scope(finally)
    local conn = connect(T)
    conn:close()
    assert_bad(1, "publish", function() conn:publish({}, "k", "x") end)
    assert_bad(1, "ack", function() conn:ack("x") end)
    assert_bad(1, "receive", function() conn:receive(-1) end)
  end)

  it("fails with 'auth' for a wrong password, without showing it", function()
    local url = H.url_with {password = "wrong-" .. H.hex(4)}
    local conn, message, kind = rpc.connect {url = url}
    assert.is_nil(conn)
    assert.equal("auth", kind, message)
    assert.is_string(message)
    H.assert_no_password(message, url)
  end)

  it("fails with 'connection' when nothing listens", function()
    local conn, message, kind = rpc.connect {url = H.url_with {host = "127.0.0.1", port = 1}}
    assert.is_nil(conn)
    assert.equal("connection", kind, message)
    assert.is_string(message)
  end)
end)

describe("conn:publish", function()
  teardown(H.cleanup)

  it("carries every property to a consumer", function()
    local T = H.scope(finally)
    local conn = connect(T)
    local q = H.queue("props")
    ok(conn:declare_queue(q))
    local headers = {s = "acme", n = 42, big = 1 << 40, neg = -7, f = 1.5, yes = true, no = false,
                     empty = "", bin = "a\0b\255"}
    local props = {
      content_type = "application/json", content_encoding = "gzip", headers = headers,
      persistent = true, priority = 7, correlation_id = "corr-1", reply_to = "somewhere",
      expiration = "60000", message_id = "msg-1", timestamp = 1700000000, type = "kind-1",
      user_id = H.USER, app_id = "spec",
    }
    assert.is_true(conn:publish("", q, "payload", props))
    local tag = ok(conn:consume(q))
    local msg = receive(conn)
    assert.equal("payload", msg.body)
    assert.equal("application/json", msg.content_type)
    assert.equal("gzip", msg.content_encoding)
    assert.equal(2, msg.delivery_mode)
    assert.equal(7, msg.priority)
    assert.equal("corr-1", msg.correlation_id)
    assert.equal("somewhere", msg.reply_to)
    assert.equal("60000", msg.expiration)
    assert.equal("msg-1", msg.message_id)
    assert.equal(1700000000, msg.timestamp)
    assert.equal("integer", math.type(msg.timestamp))
    assert.equal("kind-1", msg.type)
    assert.equal(H.USER, msg.user_id)
    assert.equal("spec", msg.app_id)
    assert.is_table(msg.headers)
    for k, v in pairs(headers) do
      assert.equal(v, msg.headers[k], k)
      if type(v) == "number" then assert.equal(math.type(v), math.type(msg.headers[k]), k) end
    end
    -- the delivery's own fields
    assert.equal("", msg.exchange)
    assert.equal(q, msg.routing_key)
    assert.equal(tag, msg.consumer_tag)
    assert.is_false(msg.redelivered)
    assert.equal("integer", math.type(msg.delivery_tag))
    assert.is_true(msg.delivery_tag > 0)
    assert.is_nil(msg.returned)
    assert.is_true(conn:ack(msg.delivery_tag))
  end)

  it("gives a message without properties none of them", function()
    local T = H.scope(finally)
    local conn = connect(T)
    local q = H.queue("bare")
    ok(conn:declare_queue(q))
    ok(conn:publish("", q, "bare"))
    ok(conn:publish("", q, "not persistent", {persistent = false}))
    ok(conn:consume(q, {ack = false}))
    for _, body in ipairs {"bare", "not persistent"} do
      local msg = receive(conn)
      assert.equal(body, msg.body)
      for _, name in ipairs {"content_type", "content_encoding", "headers", "priority", "correlation_id",
                             "reply_to", "expiration", "message_id", "timestamp", "type", "user_id",
                             "app_id", "returned"} do
        assert.is_nil(msg[name], name)
      end
      assert.is_true(msg.delivery_mode == nil or msg.delivery_mode == 1)
    end
  end)

  it("refuses a user_id that is not the connection's user (reported by the next operation)", function()
    local T = H.scope(finally)
    local conn = connect(T)
    local q = H.queue("user")
    ok(conn:declare_queue(q))
    ok(conn:publish("", q, "x", {user_id = "somebody-else"}))
    -- (not fails(): the broker's text names the user, which is also the password here)
    local v, message, kind = conn:declare_queue(q, {passive = true})
    assert.is_nil(v)
    assert.equal("broker", kind, message)
    assert.equal(0, count(conn, q))  -- the next operation works, on a new connection
  end)

  it("carries all 256 byte values, empty bodies and numbers byte-exact", function()
    local T = H.scope(finally)
    local conn = connect(T)
    local q = H.queue("bytes")
    ok(conn:declare_queue(q))
    local bodies = {all_bytes(4), "", "\0", "a\0b", 42, 1.5, -7}
    for _, body in ipairs(bodies) do assert.is_true(conn:publish("", q, body)) end
    ok(conn:consume(q, {ack = false}))
    for _, body in ipairs(bodies) do
      local msg = receive(conn)
      assert.equal("string", type(msg.body))
      assert.equal(#tostring(body), #msg.body)
      assert.is_true(msg.body == tostring(body), "different bytes for a body of " .. #tostring(body))
    end
  end)

  it("carries a 1 MiB body", function()
    local T = H.scope(finally)
    local conn = connect(T)
    local q = H.queue("big")
    ok(conn:declare_queue(q))
    local parts, x = {}, 12345
    for i = 1, 1024 * 1024 / 4 do  -- varied bytes over many frames
      x = (x * 1103515245 + 12345) % 2^31
      parts[i] = string.pack("<I4", x)
    end
    local body = table.concat(parts)
    assert.is_true(conn:publish("", q, body))
    assert.is_true(conn:publish("", q, "after"))
    ok(conn:consume(q, {ack = false}))
    local msg = receive(conn, 10)
    assert.equal(#body, #msg.body)
    assert.is_true(msg.body == body, "the 1 MiB body differs")
    assert.equal("after", receive(conn).body)
  end)

  it("gives back a mandatory message nothing is bound for through receive, returned", function()
    local T = H.scope(finally)
    local conn = connect(T)
    local key = H.queue("unroutable")  -- never declared
    assert.is_true(conn:publish("", key, "lost?", {correlation_id = "c-1"}, true))
    local msg = receive(conn)
    assert.is_true(msg.returned)
    assert.equal(312, msg.reply_code)
    assert.equal("integer", math.type(msg.reply_code))
    assert.equal("NO_ROUTE", msg.reply_text)
    assert.equal("lost?", msg.body)
    assert.equal("", msg.exchange)
    assert.equal(key, msg.routing_key)
    assert.equal("c-1", msg.correlation_id)
    assert.is_nil(msg.delivery_tag)
    -- through an exchange, and not mandatory: silently dropped
    assert.is_true(conn:publish("amq.direct", key, "via amq.direct", nil, true))
    msg = receive(conn)
    assert.is_true(msg.returned)
    assert.equal("amq.direct", msg.exchange)
    assert.equal(312, msg.reply_code)
    assert.is_true(conn:publish("", key, "dropped", nil, false))
    assert.is_true(conn:publish("", key, "dropped too"))
    assert_nothing(conn)
  end)

  it("to a missing exchange is reported by the next operation as 'no_route'; the one after works", function()
    local T = H.scope(finally)
    local conn = connect(T)
    local q = H.queue("after-404")
    ok(conn:declare_queue(q))
    local missing = "spec-x-missing-" .. H.hex(6)
    assert.is_true(conn:publish(missing, "k", "x"))
    local message = fails("no_route", conn:declare_queue(q, {passive = true}))
    assert.matches(missing, message, 1, true)
    assert.matches("disconnected", tostring(conn), 1, true)
    H.assert_no_password(tostring(conn))
    -- reconnected: publishing and consuming work again
    assert.is_true(conn:publish("", q, "again"))
    ok(conn:consume(q, {ack = false}))
    assert.equal("again", receive(conn).body)
    assert.is_nil(tostring(conn):find("disconnected", 1, true))
  end)
end)

describe("conn:declare_exchange", function()
  teardown(H.cleanup)

  it("declares direct, fanout, topic and headers exchanges (redeclaring the same is fine)", function()
    local T = H.scope(finally)
    local conn = connect(T)
    for _, kind in ipairs {"direct", "fanout", "topic", "headers"} do
      local x = exchange(T, kind)
      assert.is_true(conn:declare_exchange(x, kind))
      assert.is_true(conn:declare_exchange(x, kind))
      assert.is_true(conn:declare_exchange(x, kind, {passive = true}))
    end
  end)

  it("routes a headers exchange by headers, with x-match all and any in the bind arguments", function()
    local T = H.scope(finally)
    local conn = connect(T)
    local x = exchange(T, "headers")
    assert.is_true(conn:declare_exchange(x, "headers"))
    local all, any = H.queue("all"), H.queue("any")
    ok(conn:declare_queue(all))
    ok(conn:declare_queue(any))
    assert.is_true(conn:bind(all, x, "", {["x-match"] = "all", format = "pdf", kind = "report"}))
    assert.is_true(conn:bind(any, x, "", {["x-match"] = "any", format = "pdf", kind = "report"}))
    assert.is_true(conn:publish(x, "", "both", {headers = {format = "pdf", kind = "report", extra = 1}}))
    assert.is_true(conn:publish(x, "ignored", "pdf log", {headers = {format = "pdf", kind = "log"}}))
    assert.is_true(conn:publish(x, "", "zip", {headers = {format = "zip"}}))
    assert.is_true(conn:publish(x, "", "no headers"))
    local got = collect(conn, {all, any}, 3)
    assert.same({"both"}, got[all])
    assert.same({"both", "pdf log"}, got[any])
  end)

  it("durable: redeclaring it transient is refused with 'broker'", function()
    local T = H.scope(finally)
    local conn = connect(T)
    local x = exchange(T, "durable")
    assert.is_true(conn:declare_exchange(x, "direct", {durable = true}))
    assert.is_true(conn:declare_exchange(x, "direct", {durable = true}))
    local message = fails("broker", conn:declare_exchange(x, "direct"))
    assert.matches("durable", message, 1, true)
    assert.is_true(conn:declare_exchange(x, "direct", {passive = true}))
  end)

  it("auto_delete: the exchange goes with its last binding", function()
    local T = H.scope(finally)
    local conn = connect(T)
    local x = exchange(T, "auto")
    local q = H.queue("auto-x")
    assert.is_true(conn:declare_exchange(x, "fanout", {auto_delete = true}))
    ok(conn:declare_queue(q))
    assert.is_true(conn:bind(q, x))
    assert.is_true(conn:declare_exchange(x, "fanout", {passive = true}))
    assert.is_true(conn:unbind(q, x))
    H.wait_until(function()
      local v, _, kind = conn:declare_exchange(x, "fanout", {passive = true})
      if v then return false end
      assert.equal("no_route", kind)
      return true
    end, 5, "the auto_delete exchange to go")
  end)

  it("internal: publishing to it is refused, reported by the next operation as 'broker'", function()
    local T = H.scope(finally)
    local conn = connect(T)
    local x = exchange(T, "internal")
    local q = H.queue("internal")
    assert.is_true(conn:declare_exchange(x, "fanout", {internal = true}))
    ok(conn:declare_queue(q))
    assert.is_true(conn:bind(q, x))
    assert.is_true(conn:publish(x, "", "x"))
    local message = fails("broker", conn:declare_queue(q, {passive = true}))
    assert.matches("internal", message, 1, true)
    assert.equal(0, count(conn, q))
  end)

  it("passive on a missing exchange fails with 'no_route'; the next operation reconnects", function()
    local T = H.scope(finally)
    local conn = connect(T)
    local missing = "spec-x-missing-" .. H.hex(6)
    local message = fails("no_route", conn:declare_exchange(missing, "direct", {passive = true}))
    assert.matches(missing, message, 1, true)
    -- the passive declare did not create it
    fails("no_route", conn:declare_exchange(missing, "topic", {passive = true}))
    local q = H.queue("after-passive")
    ok(conn:declare_queue(q))
    assert.equal(0, count(conn, q))
  end)

  it("redeclaring with another type fails with 'broker'; the next operation uses a new connection", function()
    local T = H.scope(finally)
    local conn = connect(T)
    local x = exchange(T, "retype")
    assert.is_true(conn:declare_exchange(x, "direct"))
    local before = H.broker_ports()
    local message = fails("broker", conn:declare_exchange(x, "fanout"))
    assert.matches("type", message, 1, true)
    assert.equal(("rpc.connection (amqp://%s@%s/%s, disconnected)"):format(H.USER, H.HOSTPORT, H.VHOST),
                 tostring(conn))
    assert.is_true(conn:declare_exchange(x, "direct", {passive = true}))
    local after = H.broker_ports()
    assert.equal(1, #H.new_ports(before, after), "no new connection to the broker")
    assert.equal(#before, #after, "the old connection is still open")
  end)
end)

describe("conn:declare_queue", function()
  teardown(H.cleanup)

  it("returns a server-named queue (amq.gen-) for no name or an empty one, with integer counts", function()
    local T = H.scope(finally)
    local conn = connect(T)
    local names = {}
    local name, messages, consumers = ok(conn:declare_queue())
    names[1] = name
    later(T, function(c) c:delete_queue(name) end)
    assert.matches("^amq%.gen%-", name)
    assert.equal(0, messages)
    assert.equal(0, consumers)
    assert.equal("integer", math.type(messages))
    assert.equal("integer", math.type(consumers))
    local second = ok(conn:declare_queue("", {exclusive = true}))
    later(T, function(c) c:delete_queue(second) end)
    assert.matches("^amq%.gen%-", second)
    assert.are_not.equal(name, second)
    -- usable like any other
    assert.is_true(conn:publish("", second, "to a generated name"))
    wait_count(conn, second, 1)
  end)

  it("durable: redeclaring it transient is refused with 'broker'", function()
    local T = H.scope(finally)
    local conn = connect(T)
    local q = H.queue("durable")
    assert.equal(q, ok(conn:declare_queue(q, {durable = true})))
    fails("broker", conn:declare_queue(q))
    assert.equal(q, ok(conn:declare_queue(q, {durable = true})))
  end)

  it("exclusive: another connection cannot consume it ('broker'); it goes with its connection", function()
    local T = H.scope(finally)
    local owner, other = connect(T), connect(T)
    local q = H.queue("exclusive")
    ok(owner:declare_queue(q, {exclusive = true}))
    fails("broker", other:consume(q))
    fails("broker", other:declare_queue(q, {passive = true}))
    ok(owner:consume(q))  -- its own connection can
    owner:close()
    H.wait_until(function()
      local v, _, kind = other:declare_queue(q, {passive = true})
      if v then return false end
      assert.equal("no_route", kind)
      return true
    end, 5, "the exclusive queue to go with its connection")
  end)

  it("auto_delete: the queue goes when its consumer cancels", function()
    local T = H.scope(finally)
    local conn, other = connect(T), connect(T)
    local q = H.queue("auto")
    ok(conn:declare_queue(q, {auto_delete = true}))
    local tag = ok(conn:consume(q))
    assert.equal(1, select(2, count(other, q)))
    assert.is_true(conn:cancel(tag))
    H.wait_until(function()
      local v, _, kind = other:declare_queue(q, {passive = true})
      if v then return false end
      assert.equal("no_route", kind)
      return true
    end, 5, "the auto_delete queue to go")
  end)

  it("takes arguments: x-message-ttl expires a message, x-max-length drops the oldest", function()
    local T = H.scope(finally)
    local conn = connect(T)
    local ttl, max = H.queue("ttl"), H.queue("max")
    ok(conn:declare_queue(ttl, {arguments = {["x-message-ttl"] = 200}}))
    ok(conn:declare_queue(max, {arguments = {["x-max-length"] = 2}}))
    assert.is_true(conn:publish("", ttl, "short-lived"))
    for i = 1, 3 do assert.is_true(conn:publish("", max, "m" .. i)) end
    wait_count(conn, max, 2)
    wait_count(conn, ttl, 0)
    -- the arguments were really set: redeclaring without them is refused
    fails("broker", conn:declare_queue(ttl))
    local got = collect(conn, {max, ttl}, 2)
    assert.same({"m2", "m3"}, got[max])
    assert.same({}, got[ttl])
  end)

  it("passive counts the ready messages and the consumers; a missing queue is 'no_route'", function()
    local T = H.scope(finally)
    local conn, other = connect(T), connect(T)
    local q = H.queue("counts")
    ok(conn:declare_queue(q))
    for i = 1, 3 do assert.is_true(conn:publish("", q, "m" .. i)) end
    wait_count(conn, q, 3)
    local name, messages, consumers = ok(conn:declare_queue(q, {passive = true}))
    assert.same({q, 3, 0}, {name, messages, consumers})
    ok(other:consume(q, {prefetch = 1}))
    H.wait_until(function()
      local m, c = count(conn, q)
      return m == 2 and c == 1
    end, 5, "2 ready messages and 1 consumer")
    -- a plain redeclare also counts
    name, messages, consumers = ok(conn:declare_queue(q))
    assert.same({q, 2, 1}, {name, messages, consumers})
    local missing = H.queue("missing")
    local message = fails("no_route", conn:declare_queue(missing, {passive = true}))
    assert.matches(missing, message, 1, true)
    assert.equal(2, count(conn, q))
  end)

  it("accepts a 255-byte name", function()
    local T = H.scope(finally)
    local conn = connect(T)
    local q = H.queue("long")
    q = q .. ("x"):rep(255 - #q)
    later(T, function(c) c:delete_queue(q) end)
    assert.equal(q, ok(conn:declare_queue(q)))
    assert.is_true(conn:publish("", q, "long"))
    wait_count(conn, q, 1)
  end)
end)

describe("conn:bind and conn:unbind", function()
  teardown(H.cleanup)

  it("route a message only while the queue is bound", function()
    local T = H.scope(finally)
    local conn = connect(T)
    local x = exchange(T, "direct")
    local q, key = H.queue("bound"), "key-" .. H.hex(4)
    assert.is_true(conn:declare_exchange(x, "direct"))
    ok(conn:declare_queue(q))
    assert.is_true(conn:publish(x, key, "before", nil, true))
    assert.is_true(receive(conn).returned)
    assert.is_true(conn:bind(q, x, key))
    assert.is_true(conn:publish(x, key, "while", nil, true))
    assert.is_true(conn:publish(x, key .. "-other", "other key"))
    wait_count(conn, q, 1)
    assert.is_true(conn:unbind(q, x, key))
    assert.is_true(conn:publish(x, key, "after", nil, true))
    local msg = receive(conn)
    assert.is_true(msg.returned)
    assert.equal("after", msg.body)
    assert.same({"while"}, collect(conn, {q}, 1)[q])
  end)

  it("bind with no routing key binds with the empty key", function()
    local T = H.scope(finally)
    local conn = connect(T)
    local x = exchange(T, "empty-key")
    local q = H.queue("empty-key")
    assert.is_true(conn:declare_exchange(x, "direct"))
    ok(conn:declare_queue(q))
    assert.is_true(conn:bind(q, x))
    assert.is_true(conn:publish(x, "", "empty"))
    assert.is_true(conn:publish(x, "k", "keyed"))
    assert.same({"empty"}, collect(conn, {q}, 1)[q])
  end)

  it("follow topic patterns: * is one word, # is zero or more", function()
    local T = H.scope(finally)
    local conn = connect(T)
    local x = exchange(T, "topic")
    local star, hash = H.queue("star"), H.queue("hash")
    assert.is_true(conn:declare_exchange(x, "topic"))
    ok(conn:declare_queue(star))
    ok(conn:declare_queue(hash))
    assert.is_true(conn:bind(star, x, "a.*"))
    assert.is_true(conn:bind(hash, x, "a.#"))
    for _, key in ipairs {"a.b", "a.b.c", "a", "b.a", "ab.c"} do
      assert.is_true(conn:publish(x, key, key))
    end
    local got = collect(conn, {star, hash}, 4)
    assert.same({"a.b"}, got[star])
    assert.same({"a.b", "a.b.c", "a"}, got[hash])
  end)

  it("fan a message out to every bound queue", function()
    local T = H.scope(finally)
    local conn = connect(T)
    local x = exchange(T, "fanout")
    local one, two = H.queue("one"), H.queue("two")
    assert.is_true(conn:declare_exchange(x, "fanout"))
    ok(conn:declare_queue(one))
    ok(conn:declare_queue(two))
    assert.is_true(conn:bind(one, x))
    assert.is_true(conn:bind(two, x, "whatever"))
    assert.is_true(conn:publish(x, "any key", "fan"))
    local got = collect(conn, {one, two}, 2)
    assert.same({"fan"}, got[one])
    assert.same({"fan"}, got[two])
  end)

  it("to a missing exchange or queue fails with 'no_route'", function()
    local T = H.scope(finally)
    local conn = connect(T)
    local q = H.queue("bind-missing")
    ok(conn:declare_queue(q))
    fails("no_route", conn:bind(q, "spec-x-missing-" .. H.hex(6), "k"))
    fails("no_route", conn:bind(H.queue("missing"), "amq.direct", "k"))
    assert.is_true(conn:bind(q, "amq.direct", "k-" .. H.hex(4)))
  end)
end)

describe("conn:consume", function()
  teardown(H.cleanup)

  it("with manual acks: an acked message is gone, an unacked one comes back redelivered", function()
    local T = H.scope(finally)
    local conn, other = connect(T), connect(T)
    local q = H.queue("manual")
    ok(conn:declare_queue(q))
    assert.is_true(conn:publish("", q, "acked"))
    assert.is_true(conn:publish("", q, "unacked"))
    ok(conn:consume(q))
    local first = receive(conn)
    assert.equal("acked", first.body)
    assert.is_true(conn:ack(first.delivery_tag))
    local second = receive(conn)
    assert.equal("unacked", second.body)
    assert.is_false(second.redelivered)
    assert.equal(0, count(other, q))  -- unacked: not ready
    conn:close()
    ok(other:consume(q))
    local again = receive(other)
    assert.equal("unacked", again.body)
    assert.is_true(again.redelivered)
    assert.is_true(other:ack(again.delivery_tag))
    assert_nothing(other)
  end)

  it("with ack = false: the broker considers a message acked on delivery", function()
    local T = H.scope(finally)
    local conn, other = connect(T), connect(T)
    local q = H.queue("auto-ack")
    ok(conn:declare_queue(q))
    assert.is_true(conn:publish("", q, "once"))
    ok(conn:consume(q, {ack = false}))
    assert.equal("once", receive(conn).body)
    conn:close()
    ok(other:consume(q))
    assert_nothing(other)
    assert.equal(0, count(other, q))
  end)

  it("with prefetch 1: the second message comes only once the first is acked", function()
    local T = H.scope(finally)
    local conn = connect(T)
    local q = H.queue("prefetch")
    ok(conn:declare_queue(q))
    assert.is_true(conn:publish("", q, "first"))
    assert.is_true(conn:publish("", q, "second"))
    ok(conn:consume(q, {prefetch = 1}))
    local first = receive(conn)
    assert.equal("first", first.body)
    assert_nothing(conn, 0.5)
    assert.equal(1, count(conn, q))
    assert.is_true(conn:ack(first.delivery_tag))
    local second = receive(conn)
    assert.equal("second", second.body)
    assert.is_true(conn:ack(second.delivery_tag))
  end)

  it("exclusive: no other consumer is allowed ('broker')", function()
    local T = H.scope(finally)
    local conn, other = connect(T), connect(T)
    local q = H.queue("excl-consumer")
    ok(conn:declare_queue(q))
    ok(conn:consume(q, {exclusive = true}))
    fails("broker", other:consume(q))
    -- and an exclusive consumer is refused while another consumes
    local q2 = H.queue("shared-consumer")
    ok(conn:declare_queue(q2))
    ok(conn:consume(q2))
    fails("broker", other:consume(q2, {exclusive = true}))
  end)

  it("takes a custom consumer tag; by default the broker names it", function()
    local T = H.scope(finally)
    local conn = connect(T)
    local q1, q2 = H.queue("tagged"), H.queue("untagged")
    ok(conn:declare_queue(q1))
    ok(conn:declare_queue(q2))
    local tag = "spec-tag-" .. H.hex(4)
    assert.equal(tag, ok(conn:consume(q1, {tag = tag, ack = false})))
    local default = ok(conn:consume(q2, {ack = false}))
    assert.matches("^amq%.ctag%-", default)
    assert.is_true(conn:publish("", q1, "one"))
    assert.is_true(conn:publish("", q2, "two"))
    local seen = {}
    for _ = 1, 2 do
      local msg = receive(conn)
      seen[msg.body] = msg.consumer_tag
    end
    assert.same({one = tag, two = default}, seen)
    -- a tag in use on this channel is refused
    fails("broker", conn:consume(q2, {tag = tag}))
  end)

  it("cancel stops the deliveries; the messages stay in the queue", function()
    local T = H.scope(finally)
    local conn = connect(T)
    local q = H.queue("cancel")
    ok(conn:declare_queue(q))
    local tag = ok(conn:consume(q, {ack = false}))
    assert.is_true(conn:publish("", q, "before"))
    assert.equal("before", receive(conn).body)
    assert.is_true(conn:cancel(tag))
    assert.is_true(conn:publish("", q, "after"))
    assert_nothing(conn)
    wait_count(conn, q, 1)
    assert.equal(0, select(2, count(conn, q)))
  end)

  it("on a missing queue fails with 'no_route'", function()
    local T = H.scope(finally)
    local conn = connect(T)
    fails("no_route", conn:consume(H.queue("missing")))
    local q = H.queue("present")
    ok(conn:declare_queue(q))
    ok(conn:consume(q))
  end)

  it("is told when its queue is deleted: receive fails with 'broker' and the connection stays", function()
    local T = H.scope(finally)
    local conn, other = connect(T), connect(T)
    local q, q2 = H.queue("deleted"), H.queue("kept")
    ok(conn:declare_queue(q))
    ok(conn:declare_queue(q2))
    ok(conn:consume(q))
    ok(conn:consume(q2, {ack = false}))
    ok(other:delete_queue(q))
    fails("broker", conn:receive(5))
    assert.is_true(conn:publish("", q2, "still here"))
    assert.equal("still here", receive(conn).body)
  end)
end)

describe("conn:nack, conn:reject and conn:ack", function()
  teardown(H.cleanup)

  -- A queue that dead-letters to a fanout exchange bound to a second queue; consumed (manual).
  local function dead_lettering(T, conn)
    local x = exchange(T, "dlx")
    local q, dlq = H.queue("work"), H.queue("dead")
    assert.is_true(conn:declare_exchange(x, "fanout"))
    ok(conn:declare_queue(dlq))
    assert.is_true(conn:bind(dlq, x))
    ok(conn:declare_queue(q, {arguments = {["x-dead-letter-exchange"] = x}}))
    return q, dlq, x
  end

  for _, how in ipairs {"nack", "reject"} do
    -- conn:nack(tag, false, requeue) or conn:reject(tag, requeue)
    local function refuse(conn, tag, requeue)
      if how == "nack" then return conn:nack(tag, false, requeue) end
      return conn:reject(tag, requeue)
    end

    it(how .. " requeues by default and with requeue = true: redelivered", function()
      local T = H.scope(finally)
      local conn = connect(T)
      local q = H.queue(how)
      ok(conn:declare_queue(q))
      assert.is_true(conn:publish("", q, "again"))
      ok(conn:consume(q))
      local msg = receive(conn)
      assert.is_false(msg.redelivered)
      assert.is_true(conn[how](conn, msg.delivery_tag))  -- the default: requeue
      msg = receive(conn)
      assert.equal("again", msg.body)
      assert.is_true(msg.redelivered)
      assert.is_true(refuse(conn, msg.delivery_tag, true))
      msg = receive(conn)
      assert.equal("again", msg.body)
      assert.is_true(msg.redelivered)
      assert.is_true(conn:ack(msg.delivery_tag))
      assert_nothing(conn)
    end)

    it(how .. " with requeue = false drops the message", function()
      local T = H.scope(finally)
      local conn, other = connect(T), connect(T)
      local q = H.queue(how .. "-drop")
      ok(conn:declare_queue(q))
      assert.is_true(conn:publish("", q, "dropped"))
      ok(conn:consume(q))
      assert.is_true(refuse(conn, receive(conn).delivery_tag, false))
      assert_nothing(conn)
      conn:close()
      assert.equal(0, count(other, q))
    end)

    it(how .. " with requeue = false dead-letters to the queue's x-dead-letter-exchange", function()
      local T = H.scope(finally)
      local conn = connect(T)
      local q, dlq, x = dead_lettering(T, conn)
      assert.is_true(conn:publish("", q, "dead", {headers = {mine = "kept"}}))
      ok(conn:consume(q))
      assert.is_true(refuse(conn, receive(conn).delivery_tag, false))
      ok(conn:consume(dlq, {ack = false, tag = dlq}))
      local msg = receive(conn)
      assert.equal("dead", msg.body)
      assert.equal(dlq, msg.consumer_tag)
      assert.equal(x, msg.exchange)
      assert.equal(q, msg.routing_key)
      assert.equal("kept", msg.headers.mine)
      local death = msg.headers["x-death"]
      assert.is_table(death, "no x-death header")
      assert.equal("rejected", death[1].reason)
      assert.equal(q, death[1].queue)
      assert.equal(1, death[1].count)
      assert_nothing(conn)
    end)
  end

  it("nack with multiple = true requeues every message up to the tag", function()
    local T = H.scope(finally)
    local conn = connect(T)
    local q = H.queue("nack-multiple")
    ok(conn:declare_queue(q))
    for i = 1, 3 do assert.is_true(conn:publish("", q, "m" .. i)) end
    ok(conn:consume(q))
    local last
    for i = 1, 3 do
      last = receive(conn)
      assert.equal("m" .. i, last.body)
    end
    assert.is_true(conn:nack(last.delivery_tag, true))
    for i = 1, 3 do
      local msg = receive(conn)
      assert.equal("m" .. i, msg.body)
      assert.is_true(msg.redelivered)
      last = msg
    end
    assert.is_true(conn:nack(last.delivery_tag, true, false))  -- dropped, all three
    assert_nothing(conn)
  end)

  it("ack with multiple = true acks every message up to the tag", function()
    local T = H.scope(finally)
    local conn, other = connect(T), connect(T)
    local q = H.queue("ack-multiple")
    ok(conn:declare_queue(q))
    for i = 1, 4 do assert.is_true(conn:publish("", q, "m" .. i)) end
    ok(conn:consume(q))
    local tags = {}
    for i = 1, 4 do tags[i] = receive(conn).delivery_tag end
    assert.is_true(conn:ack(tags[3], true))
    conn:close()  -- only m4 was unacked
    ok(other:consume(q))
    local msg = receive(other)
    assert.equal("m4", msg.body)
    assert.is_true(msg.redelivered)
    assert.is_true(other:ack(msg.delivery_tag))
    assert_nothing(other)
  end)

  it("an unknown delivery tag is reported by the next operation as 'broker'; the one after works", function()
    local T = H.scope(finally)
    local conn = connect(T)
    local q = H.queue("bad-tag")
    ok(conn:declare_queue(q))
    assert.is_true(conn:ack(12345))
    local message = fails("broker", conn:declare_queue(q, {passive = true}))
    assert.matches("406", message, 1, true)
    assert.equal(0, count(conn, q))
  end)
end)

describe("conn:purge, conn:delete_queue and conn:delete_exchange", function()
  teardown(H.cleanup)

  it("purge returns how many messages it removed", function()
    local T = H.scope(finally)
    local conn = connect(T)
    local q = H.queue("purge")
    ok(conn:declare_queue(q))
    assert.equal(0, ok(conn:purge(q)))
    for i = 1, 3 do assert.is_true(conn:publish("", q, "m" .. i)) end
    wait_count(conn, q, 3)
    local n = ok(conn:purge(q))
    assert.equal(3, n)
    assert.equal("integer", math.type(n))
    assert.equal(0, count(conn, q))
    fails("no_route", conn:purge(H.queue("missing")))
  end)

  it("delete_queue returns the messages deleted; if_empty and if_unused refuse with 'broker'", function()
    local T = H.scope(finally)
    local conn, other = connect(T), connect(T)
    local q = H.queue("delete")
    ok(conn:declare_queue(q))
    for i = 1, 2 do assert.is_true(conn:publish("", q, "m" .. i)) end
    wait_count(conn, q, 2)
    fails("broker", conn:delete_queue(q, {if_empty = true}))
    assert.equal(2, count(conn, q))
    local tag = ok(other:consume(q, {prefetch = 1}))
    fails("broker", conn:delete_queue(q, {if_unused = true}))
    assert.is_true(other:cancel(tag))
    local n = ok(conn:delete_queue(q, {if_unused = true}))
    assert.equal("integer", math.type(n))
    assert.is_true(n == 1 or n == 2, "deleted " .. n)  -- the one other held may be requeued by now
    fails("no_route", conn:declare_queue(q, {passive = true}))
    -- an empty queue goes with if_empty
    local empty = H.queue("empty")
    ok(conn:declare_queue(empty))
    assert.equal(0, ok(conn:delete_queue(empty, {if_empty = true})))
    fails("no_route", conn:declare_queue(empty, {passive = true}))
  end)

  it("delete_exchange deletes it; if_unused refuses one in use with 'broker'", function()
    local T = H.scope(finally)
    local conn = connect(T)
    local x = exchange(T, "delete")
    local q = H.queue("delete-x")
    assert.is_true(conn:declare_exchange(x, "direct"))
    ok(conn:declare_queue(q))
    assert.is_true(conn:bind(q, x, "k"))
    fails("broker", conn:delete_exchange(x, {if_unused = true}))
    assert.is_true(conn:declare_exchange(x, "direct", {passive = true}))
    assert.is_true(conn:delete_exchange(x))
    fails("no_route", conn:declare_exchange(x, "direct", {passive = true}))
    local unused = exchange(T, "unused")
    assert.is_true(conn:declare_exchange(unused, "fanout"))
    assert.is_true(conn:delete_exchange(unused, {if_unused = true}))
    fails("no_route", conn:declare_exchange(unused, "fanout", {passive = true}))
  end)
end)

describe("conn:receive", function()
  teardown(H.cleanup)

  it("returns nil, message, 'timeout' when nothing comes within the timeout", function()
    local T = H.scope(finally)
    local conn = connect(T)
    local q = H.queue("quiet")
    ok(conn:declare_queue(q))
    ok(conn:consume(q))
    for _, timeout in ipairs {0.5, 0.05} do
      local elapsed, msg, message, kind = H.timed(conn.receive, conn, timeout)
      assert.is_nil(msg)
      assert.equal("timeout", kind)
      assert.is_string(message)
      assert.is_true(elapsed >= timeout - 0.01, ("returned after %.3f s, before its timeout"):format(elapsed))
      assert.is_true(elapsed < timeout + 0.3, ("returned after %.3f s"):format(elapsed))
    end
    -- with no consumer at all, too
    local idle = connect(T)
    local elapsed, msg, _, kind = H.timed(idle.receive, idle, 0.2)
    assert.is_nil(msg)
    assert.equal("timeout", kind)
    assert.is_true(elapsed < 0.5, ("returned after %.3f s"):format(elapsed))
  end)

  it("receive(0) only looks at what has arrived", function()
    local T = H.scope(finally)
    local conn = connect(T)
    local q = H.queue("look")
    ok(conn:declare_queue(q))
    ok(conn:consume(q, {ack = false}))
    local elapsed, msg, _, kind = H.timed(conn.receive, conn, 0)
    assert.is_nil(msg)
    assert.equal("timeout", kind)
    assert.is_true(elapsed < 0.1, ("receive(0) took %.3f s"):format(elapsed))
    assert.is_true(conn:publish("", q, "arrived"))
    msg = H.wait_until(function()
      local m, message, k = conn:receive(0)
      if not m then assert.equal("timeout", k, message) end
      return m
    end, 5, "receive(0) to see the message")
    assert.equal("arrived", msg.body)
  end)

  it("with no timeout waits until a message comes", function()
    local T = H.scope(finally)
    local conn = connect(T)
    local q = H.queue("forever")
    ok(conn:declare_queue(q))
    ok(conn:consume(q, {ack = false}))
    T:spawn {queue = q, code = [[
      sleep(0.5)
      local c = assert(rpc.connect {url = URL})
      assert(c:publish("", QUEUE, "worth the wait"))
      c:close()
    ]]}
    local elapsed, msg, message, kind = H.timed(conn.receive, conn)
    assert.is_table(msg, tostring(message) .. " " .. tostring(kind))
    assert.equal("worth the wait", msg.body)
    assert.is_true(elapsed >= 0.4, ("returned after %.3f s"):format(elapsed))
  end)

  it("keeps messages read while doing other operations, in order", function()
    local T = H.scope(finally)
    local conn = connect(T)
    local q, q2 = H.queue("inbox"), H.queue("other")
    ok(conn:declare_queue(q))
    ok(conn:consume(q, {ack = false}))
    for i = 1, 5 do assert.is_true(conn:publish("", q, "m" .. i)) end
    ok(conn:declare_queue(q2))   -- deliveries come in while it waits for declare-ok
    assert.is_true(conn:publish("", q, "m6"))
    ok(conn:declare_queue(q2, {passive = true}))
    for i = 1, 3 do assert.equal("m" .. i, receive(conn).body) end
    assert.is_true(conn:bind(q2, "amq.fanout"))
    assert.is_true(conn:publish("", q, "m7"))
    for i = 4, 7 do assert.equal("m" .. i, receive(conn).body) end
    assert_nothing(conn, 0.1)
  end)

  it("keeps messages that arrived while idle, read before the next operation, in order", function()
    local T = H.scope(finally)
    local conn = connect(T)
    local q, q2 = H.queue("idle-inbox"), H.queue("idle-other")
    ok(conn:declare_queue(q))
    ok(conn:consume(q, {ack = false}))
    for i = 1, 5 do assert.is_true(conn:publish("", q, "m" .. i)) end
    -- not a wait for a condition: an operation after more than a second without reading
    -- reads what has arrived first (heartbeats); that is the path under test
    H.sleep(1.2)
    ok(conn:declare_queue(q2))
    assert.is_true(conn:publish("", q, "m6"))
    for i = 1, 6 do assert.equal("m" .. i, receive(conn).body) end
    assert_nothing(conn, 0.1)
  end)

  it("reports a delivery over max_body that was read during another operation", function()
    local T = H.scope(finally)
    local big, conn = connect(T), connect(T, {max_body = 10})
    local q, q2 = H.queue("idle-large"), H.queue("idle-large-other")
    ok(conn:declare_queue(q))
    ok(conn:declare_queue(q2))
    ok(conn:consume(q))
    assert.is_true(big:publish("", q, "far too large"))
    assert.is_true(big:publish("", q, "small"))
    H.sleep(1.2)  -- idle: the next operation reads what has arrived first (the path under test)
    ok(conn:declare_queue(q2))
    fails("too_large", conn:receive(1))
    assert.equal("small", receive(conn, 1).body)
  end)

  it("reports a consumer the broker cancelled while doing another operation", function()
    local T = H.scope(finally)
    local conn, other = connect(T), connect(T)
    local q, q2 = H.queue("idle-cancel"), H.queue("idle-cancel-other")
    ok(conn:declare_queue(q))
    ok(conn:declare_queue(q2))
    ok(conn:consume(q))
    ok(other:delete_queue(q))  -- the broker cancels the consumer (consumer_cancel_notify)
    H.sleep(1.2)  -- idle: the next operation reads what has arrived first (the path under test)
    ok(conn:declare_queue(q2))
    fails("broker", conn:receive(1))
  end)

  it("gives a delivery whose headers are over the caps without them (headers_too_large)", function()
    local T = H.scope(finally)
    local conn = connect(T)
    local q = H.queue("deep")
    ok(conn:declare_queue(q))
    H.amqp {
      {op = "publish", routing_key = q, body = "deep", headers_nested = 40},
      {op = "publish", routing_key = q, body = "wide", headers_keys = 2000},
      {op = "publish", routing_key = q, body = "fine", headers_nested = 8},
    }
    ok(conn:consume(q, {ack = false}))
    for _, body in ipairs {"deep", "wide"} do
      local msg = receive(conn)
      assert.equal(body, msg.body)
      assert.is_nil(msg.headers)
      assert.is_true(msg.headers_too_large)
    end
    local msg = receive(conn)
    assert.equal("fine", msg.body)
    assert.is_table(msg.headers.n)
    assert.is_nil(msg.headers_too_large)
  end)

  it("serves the rpc servers of the same Lua state while it waits", function()
    local T = H.scope(finally)
    local q = H.queue("served")
    T:server(q, function(body) return "served " .. body end)
    local conn = connect(T)
    local reply_queue = ok(conn:declare_queue("", {exclusive = true}))
    ok(conn:consume(reply_queue, {ack = false}))
    assert.is_true(conn:publish("", q, "by hand", {reply_to = reply_queue, correlation_id = "c-42"}))
    local msg = receive(conn)
    assert.equal("served by hand", msg.body)
    assert.equal("c-42", msg.correlation_id)
  end)
end)

describe("a replaced connection", function()
  teardown(H.cleanup)

  it("does not hand out messages read on the lost one (the broker redelivers them)", function()
    local T = H.scope(finally)
    local conn = connect(T)
    local q, q2 = H.queue("stale"), H.queue("stale-other")
    ok(conn:declare_queue(q))
    ok(conn:declare_queue(q2))
    assert.is_true(conn:publish("", q, "m1"))
    assert.is_true(conn:publish("", q, "m2"))
    ok(conn:consume(q))
    H.sleep(1.2)  -- idle: the next operation reads m1 and m2 ahead, for receive
    ok(conn:declare_queue(q2))
    fails("no_route", conn:declare_queue(H.queue("missing"), {passive = true}))  -- lost
    ok(conn:consume(q))  -- a new connection and consumer: the broker redelivers m1 and m2
    local got = {}
    for i = 1, 2 do
      local msg = receive(conn)
      got[i] = msg.body
      assert.is_true(msg.redelivered, msg.body .. " came from the lost connection (tag " ..
                     msg.delivery_tag .. ", not redelivered)")
      assert.is_true(conn:ack(msg.delivery_tag))
    end
    assert.same({"m1", "m2"}, got)
    assert_nothing(conn)
    assert.equal(0, count(conn, q))  -- every ack was for a delivery of this channel
  end)

  it("still hands out messages an auto-ack consumer read on the lost one (the broker will not resend them)", function()
    local T = H.scope(finally)
    local conn = connect(T)
    local q, q2 = H.queue("kept"), H.queue("kept-other")
    ok(conn:declare_queue(q))
    ok(conn:declare_queue(q2))
    assert.is_true(conn:publish("", q, "a1"))
    assert.is_true(conn:publish("", q, "a2"))
    ok(conn:consume(q, {ack = false}))
    H.sleep(1.2)  -- idle: the next operation reads a1 and a2 ahead, for receive
    ok(conn:declare_queue(q2))
    fails("no_route", conn:declare_queue(H.queue("missing"), {passive = true}))  -- lost
    ok(conn:declare_queue(q2))  -- a new connection
    local got = {}
    for i = 1, 2 do got[i] = receive(conn).body end
    assert.same({"a1", "a2"}, got)
    assert.equal(0, count(conn, q))  -- delivered once, and gone from the queue
    assert_nothing(conn)
  end)

  it("forgets the ack mode of the lost one's consumers: a reused tag takes the new mode", function()
    local T = H.scope(finally)
    local big, conn = connect(T), connect(T, {max_body = 10})
    local q = H.queue("retag")
    ok(conn:declare_queue(q))
    assert.equal("spec-tag", ok(conn:consume(q, {tag = "spec-tag"})))  -- manual acks
    fails("no_route", conn:declare_queue(H.queue("missing"), {passive = true}))  -- lost
    assert.equal("spec-tag", ok(conn:consume(q, {tag = "spec-tag", ack = false})))
    assert.is_true(big:publish("", q, "far too large"))
    assert.is_true(big:publish("", q, "small"))
    fails("too_large", conn:receive(5))  -- auto-acked: nothing to reject
    assert.equal("small", receive(conn).body)
    -- a reject of the auto-acked delivery would have closed the channel (unknown delivery tag)
    assert.equal(0, count(conn, q))
  end)
end)

describe("max_body on rpc.connect", function()
  teardown(H.cleanup)

  it("refuses to publish a body over it with 'too_large', sending nothing", function()
    local T = H.scope(finally)
    local conn = connect(T, {max_body = 1000})
    local q = H.queue("small")
    ok(conn:declare_queue(q))
    local before = H.broker_ports()
    local message = fails("too_large", conn:publish("", q, ("x"):rep(1001)))
    assert.matches("1000", message, 1, true)
    assert.is_true(conn:publish("", q, ("y"):rep(1000)))
    wait_count(conn, q, 1)
    assert.same(before, H.broker_ports())  -- the same connection all along
    ok(conn:consume(q, {ack = false}))
    assert.equal(("y"):rep(1000), receive(conn).body)
  end)

  it("refuses a delivery over it with 'too_large' and rejects it (manual acks): it does not come back", function()
    local T = H.scope(finally)
    local big = connect(T)
    local conn = connect(T, {max_body = 1000})
    local x = exchange(T, "dlx")
    local q, dlq = H.queue("refused"), H.queue("refused-dead")
    assert.is_true(big:declare_exchange(x, "fanout"))
    ok(big:declare_queue(dlq))
    assert.is_true(big:bind(dlq, x))
    ok(big:declare_queue(q, {arguments = {["x-dead-letter-exchange"] = x}}))
    local huge = ("z"):rep(300000)  -- many frames, never held
    assert.is_true(big:publish("", q, ("x"):rep(1001)))
    assert.is_true(big:publish("", q, huge))
    assert.is_true(big:publish("", q, ("y"):rep(1000)))
    ok(conn:consume(q))
    local message = fails("too_large", conn:receive(5))
    assert.matches("1001", message, 1, true)
    fails("too_large", conn:receive(5))
    local msg = receive(conn)
    assert.equal(("y"):rep(1000), msg.body)
    assert.is_true(conn:ack(msg.delivery_tag))
    assert_nothing(conn)
    -- rejected without requeueing: dead-lettered, whole
    ok(big:consume(dlq, {ack = false}))
    local first, second = receive(big), receive(big)
    assert.equal(("x"):rep(1001), first.body)
    assert.equal("rejected", first.headers["x-death"][1].reason)
    assert.is_true(second.body == huge, "the dead-lettered body differs")
    conn:close()
    assert.equal(0, count(big, q))
  end)

  it("refuses a delivery over it with 'too_large' for an auto-ack consumer too", function()
    local T = H.scope(finally)
    local big = connect(T)
    local conn = connect(T, {max_body = 10})
    local q = H.queue("refused-auto")
    ok(big:declare_queue(q))
    assert.is_true(big:publish("", q, ("x"):rep(11)))
    assert.is_true(big:publish("", q, "small"))
    ok(conn:consume(q, {ack = false}))
    fails("too_large", conn:receive(5))
    assert.equal("small", receive(conn).body)
    assert_nothing(conn)
  end)
end)

describe("bad arguments to rpc.connect and its methods", function()
  teardown(H.cleanup)
  local conn
  setup(function()
    conn = assert(rpc.connect(H.opts()))
  end)
  teardown(function() if conn then conn:close() end end)

  local LONG = ("n"):rep(256)

  --- f(conn, ...) that calls conn:name(...) as a method call statement, as a user would: the
  -- error then names the method and counts arguments after self.
  local function method(name)
    return assert(load(("local conn = ...; conn:%s(select(2, ...))"):format(name), "=" .. name))
  end

  it("rpc.connect: opts not a table, unknown keys, wrong values", function()
    assert_bad(1, "connect", function() rpc.connect("amqp://localhost/") end)
    assert_bad(1, "connect", function() rpc.connect(5) end)
    assert_bad(1, "connect", function() rpc.connect(H.opts {colour = "red"}) end, "colour")
    assert_bad(1, "connect", function() rpc.connect(H.opts {timeout = 5}) end, "timeout")
    assert_bad(1, "connect", function() rpc.connect(H.opts {exchange = "x"}) end, "exchange")
    assert_bad(1, "connect", function() rpc.connect(H.opts {[1] = true}) end)
    for _, opts in ipairs {
      {max_body = -1}, {max_body = 1.5}, {max_body = "big"}, {max_body = 536870913},
      {heartbeat = -1}, {heartbeat = "x"}, {connect_timeout = 0}, {url = 5}, {url = "not a url"},
      {urls = "x"}, {urls = {}}, {tls = {}},
    } do
      local key = next(opts)
      assert_bad(1, "connect", function() rpc.connect(H.opts(opts)) end, key)
    end
  end)

  it("a method called on something else than a connection", function()
    assert_bad(1, "publish", function() conn.publish({}, "", "k", "x") end, "rpc.connection expected")
    assert_bad(1, "receive", function() conn.receive(nil) end)
  end)

  it("declare_exchange", function()
    assert_bad(1, "declare_exchange", function() conn:declare_exchange(nil, "direct") end)
    assert_bad(1, "declare_exchange", function() conn:declare_exchange({}, "direct") end)
    assert_bad(1, "declare_exchange", function() conn:declare_exchange(true, "direct") end)
    assert_bad(1, "declare_exchange", function() conn:declare_exchange(LONG, "direct") end, "255")
    assert_bad(2, "declare_exchange", function() conn:declare_exchange("x") end)
    assert_bad(2, "declare_exchange", function() conn:declare_exchange("x", "bogus") end, "bogus")
    assert_bad(2, "declare_exchange", function() conn:declare_exchange("x", {}) end)
    assert_bad(3, "declare_exchange", function() conn:declare_exchange("x", "direct", "durable") end)
    assert_bad(3, "declare_exchange", function() conn:declare_exchange("x", "direct", {colour = 1}) end, "colour")
    assert_bad(3, "declare_exchange", function() conn:declare_exchange("x", "direct", {exclusive = true}) end,
               "exclusive")
    for _, opts in ipairs {
      {durable = "yes"}, {auto_delete = 1}, {internal = {}}, {passive = "no"},
      {arguments = "x-match"}, {arguments = {nested = {}}}, {arguments = {[1] = "x"}},
    } do
      local key, value = next(opts)
      assert_bad(3, "declare_exchange", function() conn:declare_exchange("x", "direct", opts) end,
                 type(value) ~= "table" and key or nil)
    end
  end)

  it("declare_queue", function()
    assert_bad(1, "declare_queue", function() conn:declare_queue({}) end)
    assert_bad(1, "declare_queue", function() conn:declare_queue(true) end)
    assert_bad(1, "declare_queue", function() conn:declare_queue(LONG) end, "255")
    assert_bad(2, "declare_queue", function() conn:declare_queue("q", "durable") end)
    assert_bad(2, "declare_queue", function() conn:declare_queue("q", {colour = 1}) end, "colour")
    assert_bad(2, "declare_queue", function() conn:declare_queue("q", {internal = true}) end, "internal")
    for _, opts in ipairs {
      {durable = "yes"}, {exclusive = 1}, {auto_delete = {}}, {passive = "no"},
      {arguments = 5}, {arguments = {["x-message-ttl"] = {}}}, {arguments = {[true] = 1}},
      {arguments = {[("k"):rep(256)] = 1}},
    } do
      local key, value = next(opts)
      -- a bad entry of a table names the entry, not the option
      assert_bad(2, "declare_queue", function() conn:declare_queue("q", opts) end,
                 type(value) ~= "table" and key or nil)
    end
  end)

  it("bind and unbind", function()
    for _, name in ipairs {"bind", "unbind"} do
      local f = method(name)
      assert_bad(1, name, function() f(conn, nil, "amq.direct") end)
      assert_bad(1, name, function() f(conn, {}, "amq.direct") end)
      assert_bad(1, name, function() f(conn, LONG, "amq.direct") end, "255")
      assert_bad(2, name, function() f(conn, "q") end)
      assert_bad(2, name, function() f(conn, "q", true) end)
      assert_bad(2, name, function() f(conn, "q", LONG) end, "255")
      assert_bad(3, name, function() f(conn, "q", "amq.direct", {}) end)
      assert_bad(3, name, function() f(conn, "q", "amq.direct", LONG) end, "255")
      assert_bad(4, name, function() f(conn, "q", "amq.direct", "k", "x-match=all") end)
      assert_bad(4, name, function() f(conn, "q", "amq.direct", "k", {nested = {}}) end)
      assert_bad(4, name, function() f(conn, "q", "amq.direct", "k", {[1] = "x"}) end)
    end
  end)

  it("publish", function()
    assert_bad(1, "publish", function() conn:publish(nil, "k", "x") end)
    assert_bad(1, "publish", function() conn:publish({}, "k", "x") end)
    assert_bad(1, "publish", function() conn:publish(LONG, "k", "x") end, "255")
    assert_bad(2, "publish", function() conn:publish("", nil, "x") end)
    assert_bad(2, "publish", function() conn:publish("", true, "x") end)
    assert_bad(2, "publish", function() conn:publish("", LONG, "x") end, "255")
    assert_bad(3, "publish", function() conn:publish("", "k") end)
    assert_bad(3, "publish", function() conn:publish("", "k", {}) end)
    assert_bad(3, "publish", function() conn:publish("", "k", true) end)
    assert_bad(4, "publish", function() conn:publish("", "k", "x", "persistent") end)
    assert_bad(4, "publish", function() conn:publish("", "k", "x", {colour = "red"}) end, "colour")
    assert_bad(4, "publish", function() conn:publish("", "k", "x", {delivery_mode = 2}) end, "delivery_mode")
    assert_bad(4, "publish", function() conn:publish("", "k", "x", {mandatory = true}) end, "mandatory")
    assert_bad(4, "publish", function() conn:publish("", "k", "x", {[1] = "x"}) end)
    for _, props in ipairs {
      {content_type = 5}, {content_type = LONG}, {content_encoding = true}, {headers = "k=v"},
      {headers = {nested = {}}}, {headers = {[1] = "x"}}, {headers = {[LONG] = "x"}},
      {persistent = "yes"}, {persistent = 1}, {priority = 256}, {priority = -1}, {priority = 1.5},
      {priority = "high"}, {correlation_id = {}}, {correlation_id = LONG}, {reply_to = false},
      {expiration = 60000}, {expiration = LONG}, {message_id = 1}, {timestamp = -1},
      {timestamp = 1.5}, {timestamp = "now"}, {type = {}}, {user_id = true}, {app_id = LONG},
    } do
      local key, value = next(props)
      assert_bad(4, "publish", function() conn:publish("", "k", "x", props) end,
                 type(value) ~= "table" and key or nil)
    end
    assert_bad(5, "publish", function() conn:publish("", "k", "x", nil, "yes") end)
    assert_bad(5, "publish", function() conn:publish("", "k", "x", {}, 1) end)
  end)

  it("consume and cancel", function()
    assert_bad(1, "consume", function() conn:consume(nil) end)
    assert_bad(1, "consume", function() conn:consume({}) end)
    assert_bad(1, "consume", function() conn:consume(LONG) end, "255")
    assert_bad(2, "consume", function() conn:consume("q", "ack") end)
    assert_bad(2, "consume", function() conn:consume("q", {colour = 1}) end, "colour")
    assert_bad(2, "consume", function() conn:consume("q", {no_ack = true}) end, "no_ack")
    for _, opts in ipairs {
      {ack = "no"}, {ack = 0}, {prefetch = -1}, {prefetch = 65536}, {prefetch = 1.5},
      {exclusive = 1}, {tag = 5}, {tag = {}}, {tag = LONG},
    } do
      local key = next(opts)
      assert_bad(2, "consume", function() conn:consume("q", opts) end, key)
    end
    assert_bad(1, "cancel", function() conn:cancel() end)
    assert_bad(1, "cancel", function() conn:cancel({}) end)
    assert_bad(1, "cancel", function() conn:cancel(LONG) end, "255")
  end)

  it("receive", function()
    assert_bad(1, "receive", function() conn:receive("soon") end)
    assert_bad(1, "receive", function() conn:receive({}) end)
    assert_bad(1, "receive", function() conn:receive(-1) end)
    assert_bad(1, "receive", function() conn:receive(0 / 0) end)
  end)

  it("ack, nack and reject", function()
    for _, name in ipairs {"ack", "nack", "reject"} do
      local f = method(name)
      assert_bad(1, name, function() f(conn) end)
      assert_bad(1, name, function() f(conn, "x") end)
      assert_bad(1, name, function() f(conn, {}) end)
      assert_bad(1, name, function() f(conn, 0) end)
      assert_bad(1, name, function() f(conn, -1) end)
      assert_bad(1, name, function() f(conn, 1.5) end)
      assert_bad(2, name, function() f(conn, 1, "yes") end)
      assert_bad(2, name, function() f(conn, 1, 1) end)
    end
    assert_bad(3, "nack", function() conn:nack(1, false, "no") end)
    assert_bad(3, "nack", function() conn:nack(1, false, 0) end)
  end)

  it("purge, delete_queue and delete_exchange", function()
    assert_bad(1, "purge", function() conn:purge() end)
    assert_bad(1, "purge", function() conn:purge({}) end)
    assert_bad(1, "purge", function() conn:purge(LONG) end, "255")
    assert_bad(1, "delete_queue", function() conn:delete_queue(nil) end)
    assert_bad(1, "delete_queue", function() conn:delete_queue(true) end)
    assert_bad(1, "delete_queue", function() conn:delete_queue(LONG) end, "255")
    assert_bad(2, "delete_queue", function() conn:delete_queue("q", "if_empty") end)
    assert_bad(2, "delete_queue", function() conn:delete_queue("q", {colour = 1}) end, "colour")
    assert_bad(2, "delete_queue", function() conn:delete_queue("q", {if_empty = "yes"}) end, "if_empty")
    assert_bad(2, "delete_queue", function() conn:delete_queue("q", {if_unused = 1}) end, "if_unused")
    assert_bad(1, "delete_exchange", function() conn:delete_exchange() end)
    assert_bad(1, "delete_exchange", function() conn:delete_exchange({}) end)
    assert_bad(1, "delete_exchange", function() conn:delete_exchange(LONG) end, "255")
    assert_bad(2, "delete_exchange", function() conn:delete_exchange("x", true) end)
    assert_bad(2, "delete_exchange", function() conn:delete_exchange("x", {if_empty = true}) end, "if_empty")
    assert_bad(2, "delete_exchange", function() conn:delete_exchange("x", {if_unused = "yes"}) end, "if_unused")
  end)

  it("leave the connection usable and declare nothing", function()
    local q = H.queue("after-bad")
    local ok1 = conn:declare_queue(q)
    assert.equal(q, ok1)
    assert.is_true(conn:publish("", q, "fine"))
    wait_count(conn, q, 1)
    fails("no_route", conn:declare_exchange("x", "direct", {passive = true}))
  end)
end)

describe("servers and clients through exchanges", function()
  teardown(H.cleanup)

  it("a server bound to a topic exchange serves a client publishing through it", function()
    local T = H.scope(finally)
    local x = exchange(T, "rpc")
    local math_request, str_request
    T:server("", function(body, request)
      math_request = request
      local a, b = body:match("^(%d+) (%d+)$")
      if request.routing_key == "math.add" then return tonumber(a) + tonumber(b) end
      return tonumber(a) * tonumber(b)
    end, {exclusive = true, bind = {exchange = x, routing_key = "math.*", type = "topic"}})
    -- the exchange exists now: a second server binds to it without declaring it
    T:server("", function(body, request)
      str_request = request
      return body:upper()
    end, {exclusive = true, bind = {exchange = x, routing_key = "str.#"}})
    local add = T:client("math.add", {exchange = x})
    local mul = T:client("math.mul", {exchange = x})
    local upper = T:client("str.upper", {exchange = x})
    assert.equal("5", add:call("2 3", 5))
    assert.equal(x, math_request.exchange)
    assert.equal("math.add", math_request.routing_key)
    assert.equal("6", mul:call("2 3", 5))
    assert.equal("HELLO", upper:call("hello", 5))
    assert.equal("str.upper", str_request.routing_key)
    assert.equal(x, str_request.exchange)
    local deep = T:client("str.upper.twice", {exchange = x})
    assert.equal("DEEP", deep:call("deep", 5))
    -- the exchange is a topic exchange: redeclaring it as another type is refused
    local conn = connect(T)
    assert.is_true(conn:declare_exchange(x, "topic"))
    fails("broker", conn:declare_exchange(x, "direct"))
  end)

  it("a client whose key nothing is bound to fails with 'no_route' at once", function()
    local T = H.scope(finally)
    local x = exchange(T, "rpc")
    T:server("", handler, {exclusive = true, bind = {exchange = x, routing_key = "math.*", type = "topic"}})
    for _, key in ipairs {"math", "math.add.more", "other.add"} do
      local client = T:client(key, {exchange = x})
      local elapsed, reply, message, kind = H.timed(client.call, client, "1 2", 10)
      assert.is_nil(reply, key)
      assert.equal("no_route", kind, message)
      assert.is_true(elapsed < 1, ("%s took %.3f s with a 10 s timeout"):format(key, elapsed))
    end
    -- a missing exchange is no_route too
    local client = T:client("math.add", {exchange = "spec-x-missing-" .. H.hex(6)})
    local elapsed, reply, _, kind = H.timed(client.call, client, "1 2", 10)
    assert.is_nil(reply)
    assert.equal("no_route", kind)
    assert.is_true(elapsed < 1, ("took %.3f s"):format(elapsed))
  end)

  it("bind takes a list of bindings; a binding's routing key defaults to the queue name", function()
    local T = H.scope(finally)
    local direct, fanout = exchange(T, "direct"), exchange(T, "fanout")
    local q = H.queue("multi")
    T:server(q, function(body, request)
      return request.exchange .. "|" .. request.routing_key .. "|" .. body
    end, {bind = {
      {exchange = direct, routing_key = "k1", type = "direct"},
      {exchange = direct, type = "direct"},
      {exchange = fanout, type = "fanout", routing_key = ""},
    }})
    assert.equal(direct .. "|k1|a", T:client("k1", {exchange = direct}):call("a", 5))
    assert.equal(direct .. "|" .. q .. "|b", T:client(q, {exchange = direct}):call("b", 5))
    assert.equal(fanout .. "|any|c", T:client("any", {exchange = fanout}):call("c", 5))
    assert.equal("|" .. q .. "|d", T:client(q):call("d", 5))  -- the default exchange still
    assert.equal("no_route", select(3, T:client("k2", {exchange = direct}):call("e", 5)))
  end)

  it("bind.durable declares a durable exchange", function()
    local T = H.scope(finally)
    local x = exchange(T, "durable")
    T:server("", handler, {exclusive = true, bind = {exchange = x, routing_key = "k", type = "direct",
                                                   durable = true}})
    local conn = connect(T)
    assert.is_true(conn:declare_exchange(x, "direct", {durable = true}))
    local y = exchange(T, "transient")
    T:server("", handler, {exclusive = true, bind = {exchange = y, routing_key = "k", type = "direct"}})
    assert.is_true(conn:declare_exchange(y, "direct"))
  end)

  it("a server whose bind names a missing exchange (no type) fails with 'no_route'", function()
    local missing = "spec-x-missing-" .. H.hex(6)
    local server, message, kind = rpc.server(H.queue("nox"), handler, H.opts {bind = {exchange = missing}})
    if server then server:close() end
    assert.is_nil(server)
    assert.equal("no_route", kind, message)
    assert.matches(missing, message, 1, true)
    H.assert_no_password(message)
  end)

  it("bad bind options are bad arguments", function()
    local x = "spec-x-never"
    for _, bind in ipairs {
      "x", 5, true,
      {},
      {exchange = ""}, {exchange = 5}, {exchange = ("x"):rep(256)}, {routing_key = "k"},
      {exchange = x, colour = "red"}, {exchange = x, type = "bogus"}, {exchange = x, type = 5},
      {exchange = x, durable = "yes"}, {exchange = x, routing_key = 5},
      {exchange = x, routing_key = ("k"):rep(256)},
      {{exchange = x}, "not a table"}, {{exchange = x}, {exchange = x, colour = 1}},
    } do
      assert_bad(3, "server", function() rpc.server("", handler, H.opts {bind = bind}) end)
    end
    -- and nothing was declared
    local conn = assert(rpc.connect(H.opts()))
    fails("no_route", conn:declare_exchange(x, "direct", {passive = true}))
    conn:close()
  end)

  it("a client's exchange option is checked", function()
    assert_bad(2, "client", function() rpc.client("k", H.opts {exchange = 5}) end, "exchange")
    assert_bad(2, "client", function() rpc.client("k", H.opts {exchange = ("x"):rep(256)}) end, "exchange")
  end)
end)

describe("a connection used from finalizers and handlers", function()
  teardown(H.cleanup)

  it("closes after the message in hand when a finalizer closes it during receive", function()
    local T = H.scope(finally)
    local mode = collectgarbage("generational")
    T:defer(function()
      if mode == "generational" then collectgarbage(mode, 20, 100) else collectgarbage(mode, 200, 100, 13) end
    end)
    local headers = {}
    for i = 1, 1000 do headers[("k%04d"):format(i)] = ("v"):rep(80) .. i end
    local fired_once = false
    -- the collection must fall inside receive's conversion: leave K bytes of allocation room
    for _, K in ipairs {20000, 5000, 60000, 1000, 120000} do
      local conn = connect(T)
      local q = ok(conn:declare_queue("", {exclusive = true}))
      ok(conn:consume(q, {ack = false}))
      ok(conn:publish("", q, "small", {headers = headers}))
      local fired = false
      local function arm()  -- its own frame: no register of the test's keeps the garbage alive
        collectgarbage("step")  -- a young collection: the next comes after 20 % of the heap
        local total = collectgarbage("count") * 1024
        local filler = ("f"):rep(math.max(0, math.floor(total * 0.2) - K))
        setmetatable({}, {__gc = function() fired = true conn:close() end})
        return #filler
      end
      arm()
      local msg, message, kind = conn:receive(5)
      if fired and msg then
        fired_once = true
        assert.equal("small", msg.body)  -- whole: read before the close took effect
        local n = 0
        for _ in pairs(msg.headers) do n = n + 1 end
        assert.equal(1000, n)
        fails("closed", conn:receive(0))
        break
      end
      assert.is_true(kind == nil or kind == "closed", message)
    end
    assert.is_true(fired_once, "no finalizer ran inside receive in 5 tries")
  end)

  it("receive returns a message that a handler it served read on the same connection", function()
    local T = H.scope(finally)
    local conn = connect(T)
    local q, sq = ok(conn:declare_queue("", {exclusive = true})), H.queue("nested")
    ok(conn:consume(q, {ack = false}))
    T:server(sq, function()
      H.sleep(1.1)                              -- quiet: the publish below reads ahead first
      ok(conn:publish("", q, "second"))         -- its read-ahead takes "first" into the inbox
      return "ok"
    end)
    ok(conn:publish("", sq, "go", {reply_to = "amq.gen-nobody"}))
    ok(conn:publish("", q, "first"))
    local elapsed, msg = H.timed(conn.receive, conn, 5)
    assert.is_table(msg)
    assert.equal("first", msg.body)
    assert.is_true(elapsed < 3, ("receive waited %.1f s past its message"):format(elapsed))
  end)

  it("receive ends with 'interrupted' when SIGTERM reaches a server:run() whose handler waits in it", function()
    local T = H.scope(finally)
    local q = H.queue("sigwait")
    local child = T:spawn {queue = q, code = [[
local conn = assert(rpc.connect({url = URL}))
local mine = assert(conn:declare_queue("", {exclusive = true}))
assert(conn:consume(mine, {ack = false}))
local server = assert(rpc.server(QUEUE, function()
  touch("waiting")
  print("receive:", select(3, conn:receive()))   -- no timeout: only a signal ends it
  return "ok"
end, {url = URL}))
assert(conn:publish("", QUEUE, "go"))
ready()
print("run:", server:run())
]]}
    child:wait_ready()
    child:wait_file("waiting", 10)
    child:kill("TERM")
    local status = child:wait(5)
    assert.is_not_nil(status, "still running after SIGTERM; output:\n" .. child:output())
    assert.matches("receive:%s+interrupted", child:output())
    assert.matches("run:%s+true", child:output())
  end)

  it("a server with a broker-named queue makes it exclusive: nobody else can use it", function()
    local T = H.scope(finally)
    local server = T:server("", handler)
    local name = tostring(server):match("queue '(amq%.gen%-[^']+)'")
    assert.is_string(name, tostring(server))
    local other = connect(T)
    fails("broker", other:declare_queue(name, {passive = true}))  -- 405 RESOURCE_LOCKED
  end)
end)
