-- rpc.client and client:call against the real broker: replies, bodies, timeouts, no_route,
-- reply modes, load sharing, call options on the wire, exchanges, stats.
local H = require "support.helpers"
local rpc = require "rpc"

-- A child server on QUEUE: replies SPEC_NAME .. body; a body "sleep S rest" sleeps S seconds
-- first and replies SPEC_NAME .. rest.
local SLEEPY_SERVER = [[
local name = os.getenv("SPEC_NAME") or ""
local server = assert(rpc.server(QUEUE, function(body)
  local seconds, rest = body:match("^sleep (%S+) (.*)$")
  if seconds then sleep(tonumber(seconds)) end
  return name .. (rest or body)
end, {url = URL}))
ready()
print("run:", server:run())
server:close()
]]

local function all_bytes(times)
  local t = {}
  for i = 0, 255 do t[#t + 1] = string.char(i) end
  return string.rep(table.concat(t), times)
end

describe("client:call", function()
  teardown(H.cleanup)

  it("returns the reply of a server in the same Lua state as a string", function()
    local T = H.scope(finally)
    local queue = H.queue("hello")
    T:server(queue, function(body) return "hello, " .. body end)
    local client = T:client(queue)
    local reply, message, kind = client:call("world", 5)
    assert.equal("hello, world", reply)
    assert.is_nil(message)
    assert.is_nil(kind)
    assert.equal("string", type(reply))
  end)

  it("sends a number body as its tostring text", function()
    local T = H.scope(finally)
    local queue = H.queue("number")
    T:server(queue, function(body) return "<" .. body .. ">" end)
    local client = T:client(queue)
    for _, n in ipairs {42, -7, 1.5, 0, math.maxinteger, 1e100} do
      assert.equal("<" .. tostring(n) .. ">", client:call(n, 5))
    end
  end)

  it("gives a number returned by the handler as its tostring text", function()
    local T = H.scope(finally)
    local queue = H.queue("number-reply")
    T:server(queue, function(body) return tonumber(body) * 2 end)
    local client = T:client(queue)
    assert.equal("42", client:call("21", 5))
    assert.equal(tostring(0.25 * 2), client:call("0.25", 5))
  end)

  it("carries all 256 byte values byte-exact both ways", function()
    local T = H.scope(finally)
    local queue = H.queue("bytes")
    local received
    T:server(queue, function(body) received = body; return body end)
    local client = T:client(queue)
    local body = all_bytes(4)
    local reply = client:call(body, 5)
    assert.equal(#body, #received)
    assert.is_true(received == body, "the server received different bytes")
    assert.equal(#body, #reply)
    assert.is_true(reply == body, "the reply has different bytes")
  end)

  it("keeps embedded zeros and empty bodies", function()
    local T = H.scope(finally)
    local queue = H.queue("zeros")
    T:server(queue, function(body) return body .. "\0|" .. #body end)
    local client = T:client(queue)
    for _, body in ipairs {"\0", "a\0b", "\0\0\0x\0", ""} do
      assert.equal(body .. "\0|" .. #body, client:call(body, 5))
    end
  end)

  it("carries a 1 MiB body both ways", function()
    local T = H.scope(finally)
    local queue = H.queue("big")
    local size
    T:server(queue, function(body) size = #body; return body end)
    local client = T:client(queue)
    local parts, x = {}, 12345
    for i = 1, 1024 * 1024 / 4 do  -- varied bytes, not one repeated frame
      x = (x * 1103515245 + 12345) % 2^31
      parts[i] = string.pack("<I4", x)
    end
    local body = table.concat(parts)
    assert.equal(1024 * 1024, #body)
    local reply, message, kind = client:call(body, 20)
    assert.is_nil(message, kind)
    assert.equal(#body, size)
    assert.equal(#body, #reply)
    assert.is_true(reply == body, "the 1 MiB reply differs from the request")
  end)

  it("returns nil, message, 'timeout' when the queue exists but nobody consumes it", function()
    local T = H.scope(finally)
    local queue = H.queue("unconsumed")
    assert.is_true(H.amqp1 {op = "declare", queue = queue}.ok)
    local client = T:client(queue)
    local elapsed, reply, message, kind = H.timed(client.call, client, "anyone?", 0.5)
    assert.is_nil(reply)
    assert.equal("timeout", kind)
    assert.is_string(message)
    assert.is_truthy(message:find(queue, 1, true) or message:lower():find("time"),
      "the message names neither the queue nor a timeout: " .. message)
    assert.is_true(elapsed >= 0.5 - 0.01, ("returned after %.3f s, before its timeout"):format(elapsed))
    assert.is_true(elapsed < 0.5 + 0.5, ("returned after %.3f s"):format(elapsed))
    assert.equal(1, client:stats().timeouts)
  end)

  it("uses the client's timeout option when call has none", function()
    local T = H.scope(finally)
    local queue = H.queue("default-timeout")
    assert.is_true(H.amqp1 {op = "declare", queue = queue}.ok)
    local client = T:client(queue, {timeout = 0.4})
    local elapsed, reply, _, kind = H.timed(client.call, client, "anyone?")
    assert.is_nil(reply)
    assert.equal("timeout", kind)
    assert.is_true(elapsed >= 0.4 - 0.01 and elapsed < 0.4 + 0.5, ("took %.3f s"):format(elapsed))
  end)

  it("discards a reply that comes after its call timed out and never gives it to the next call", function()
    local T = H.scope(finally)
    local queue = H.queue("late")
    T:spawn {code = SLEEPY_SERVER, queue = queue}:wait_ready()
    local client = T:client(queue)
    local elapsed, reply, message, kind = H.timed(client.call, client, "sleep 1 first", 0.3)
    assert.is_nil(reply)
    assert.equal("timeout", kind)
    assert.is_string(message)
    assert.is_true(elapsed < 0.3 + 0.5, ("timed out after %.3f s"):format(elapsed))
    -- the server replies to "first" while this call waits; then it serves "second"
    assert.equal("second", client:call("second", 10))
    local stats = client:stats()
    assert.equal(1, stats.discarded)
    assert.equal(1, stats.timeouts)
    assert.equal(2, stats.calls)
  end)

  it("discards replies with a foreign, malformed or missing correlation id and counts them", function()
    local T = H.scope(finally)
    local queue, reply_queue = H.queue("foreign"), H.queue("replies")
    T:server(queue, function(body) return "own:" .. body end, {reply_to_allow = reply_queue})
    local client = T:client(queue, {reply_to = reply_queue})
    H.amqp {  -- junk already waiting in the reply queue before the call
      {op = "publish", routing_key = reply_queue, body = "foreign",
       properties = {correlation_id = "0b5a4f2e-8a64-4c59-9d6e-1f0c1a2b3c4d"}},
      {op = "publish", routing_key = reply_queue, body = "malformed",
       properties = {correlation_id = "not-a-uuid"}},
      {op = "publish", routing_key = reply_queue, body = "missing"},
    }
    H.wait_until(function()
      return (H.amqp1 {op = "count", queue = reply_queue}).messages == 0
    end, 5, "the client to take the junk off its reply queue")
    assert.equal("own:x", client:call("x", 5))
    local stats = client:stats()
    assert.equal(3, stats.discarded)
    assert.equal(1, stats.replies)
  end)

  it("fails with 'no_route' at once when nothing is bound to the routing key", function()
    local T = H.scope(finally)
    local client = T:client(H.queue("undeclared"))
    local elapsed, reply, message, kind = H.timed(client.call, client, "hello?", 10)
    assert.is_nil(reply)
    assert.equal("no_route", kind)
    assert.is_string(message)
    assert.matches("[Rr][Oo][Uu][Tt]", message)
    assert.is_true(elapsed < 1, ("took %.3f s with a 10 s timeout"):format(elapsed))
    assert.equal(1, client:stats().no_route)
  end)

  describe("reply_to", function()
    -- Two calls through a client in reply mode `mode`; the reply_to each request carried.
    local function check_mode(T, mode, reply_to_pattern)
      local queue = H.queue("mode")
      local seen = {}
      T:server(queue, function(body, request)
        seen[#seen + 1] = request.reply_to
        return body:upper()
      end, {reply_to_allow = "spec%-replies%-%x+"})  -- the named mode's queue, from H.queue
      local client = T:client(queue, mode and {reply_to = mode})
      assert.equal("ONE", client:call("one", 5))
      assert.equal("TWO", client:call("two", 5))
      assert.equal(2, #seen)
      assert.matches(reply_to_pattern, seen[1])
      return client, seen
    end

    it("is 'direct' by default: amq.rabbitmq.reply-to", function()
      check_mode(H.scope(finally), nil, "^amq%.rabbitmq%.reply%-to")
    end)

    it("'direct' uses amq.rabbitmq.reply-to", function()
      check_mode(H.scope(finally), "direct", "^amq%.rabbitmq%.reply%-to")
    end)

    it("'exclusive' uses a server-named exclusive queue of its own", function()
      local _, seen = check_mode(H.scope(finally), "exclusive", "^amq%.gen%-")
      assert.equal(seen[1], seen[2])
      local info = H.amqp1 {op = "count", queue = seen[1]}
      assert.equal(405, info.error, "another connection could use the reply queue")
    end)

    it("any other string names a durable reply queue", function()
      local reply_queue = H.queue("replies")
      local client, seen = check_mode(H.scope(finally), reply_queue,
                                      "^" .. reply_queue:gsub("%p", "%%%0") .. "$")
      assert.equal(reply_queue, seen[2])
      client:close()
      -- it outlives the client and it is durable: redeclaring it transient is refused
      local results = H.amqp {
        {op = "count", queue = reply_queue},
        {op = "declare", queue = reply_queue, durable = false},
      }
      assert.is_true(results[1].ok)
      assert.equal(406, results[2].error)
    end)

    it("refuses a second client on a named reply queue in use with nil, message, 'broker'", function()
      local T = H.scope(finally)
      local queue, reply_queue = H.queue("shared"), H.queue("replies")
      T:client(queue, {reply_to = reply_queue})
      local client, message, kind = rpc.client(queue, H.opts {reply_to = reply_queue})
      if client then client:close() end
      assert.is_nil(client)
      assert.equal("broker", kind)
      assert.is_string(message)
    end)
  end)

  it("shares the load between two server processes on one queue", function()
    local T = H.scope(finally)
    local queue = H.queue("shared")
    T:spawn {code = SLEEPY_SERVER, queue = queue, env = {SPEC_NAME = "alpha:"}}:wait_ready()
    T:spawn {code = SLEEPY_SERVER, queue = queue, env = {SPEC_NAME = "beta:"}}:wait_ready()
    local client = T:client(queue)
    local count = {}
    for i = 1, 20 do
      local reply, message, kind = client:call("n" .. i, 5)
      assert.is_string(reply, message, kind)
      local name, body = reply:match("^(%a+):(.*)$")
      assert.equal("n" .. i, body)
      count[name] = (count[name] or 0) + 1
    end
    assert.is_true((count.alpha or 0) > 0, "alpha served nothing")
    assert.is_true((count.beta or 0) > 0, "beta served nothing")
    assert.equal(20, count.alpha + count.beta)
  end)

  describe("callopts", function()
    it("give the handler's request content_type and headers with their Lua types", function()
      local T = H.scope(finally)
      local queue = H.queue("callopts")
      local request
      T:server(queue, function(body, req) request = req; return "ok" end)
      local client = T:client(queue)
      local headers = {tenant = "acme", n = 42, big = 1 << 40, f = 1.5, yes = true, no = false,
                       empty = "", bin = "a\0b"}
      assert.equal("ok", client:call("x", 5, {content_type = "application/json", headers = headers,
                                              priority = 3, persistent = true}))
      assert.equal("application/json", request.content_type)
      assert.is_table(request.headers)
      assert.equal("acme", request.headers.tenant)
      assert.equal(42, request.headers.n)
      assert.equal("integer", math.type(request.headers.n))
      assert.equal(1 << 40, request.headers.big)
      assert.equal("integer", math.type(request.headers.big))
      assert.equal(1.5, request.headers.f)
      assert.equal("float", math.type(request.headers.f))
      assert.is_true(request.headers.yes)
      assert.is_false(request.headers.no)
      assert.equal("", request.headers.empty)
      assert.equal("a\0b", request.headers.bin)
    end)

    it("put priority, delivery mode, content_type, headers, expiration and a uuid on the wire", function()
      local T = H.scope(finally)
      local queue = H.queue("wire")
      -- a pika consumer that prints each request's properties and echoes it
      local capture = T:spawn {python = H.AMQP_TOOL, args = {"capture", queue}}
      capture:wait_output("ready")
      local client = T:client(queue)
      assert.equal("one", client:call("one", 7, {priority = 5, persistent = true,
        content_type = "text/plain", headers = {tenant = "acme", n = 7}}))
      assert.equal("two", client:call("two", 2.5))
      local out = capture:wait_output('"two"')
      local json = require "dkjson"
      local requests = {}
      for line in out:gmatch("[^\n]+") do
        if line:sub(1, 1) == "{" then requests[#requests + 1] = json.decode(line) end
      end
      assert.equal(2, #requests)
      local one, two = requests[1].properties, requests[2].properties
      assert.equal("one", requests[1].body)
      assert.equal(5, one.priority)
      assert.equal(2, one.delivery_mode)
      assert.equal("text/plain", one.content_type)
      assert.equal("acme", one.headers.tenant)
      assert.equal(7, one.headers.n)
      assert.equal("7000", one.expiration)
      assert.equal("2500", two.expiration)
      assert.is_nil(two.priority)
      assert.is_true(two.delivery_mode == nil or two.delivery_mode == 1, "the second request is persistent")
      for _, p in ipairs {one, two} do
        assert.matches(H.UUID, p.correlation_id)
        assert.matches("^amq%.rabbitmq%.reply%-to", p.reply_to)
      end
      assert.are_not.equal(one.correlation_id, two.correlation_id)
      assert.equal("", requests[1].exchange)
      assert.equal(queue, requests[1].routing_key)
    end)

    it("publish through exchange and routing_key", function()
      local T = H.scope(finally)
      local queue, key = H.queue("bound"), "spec-key-" .. H.hex(6)
      local request
      T:server(queue, function(body, req) request = req; return "via " .. body end)
      assert.is_true(H.amqp1 {op = "bind", queue = queue, exchange = "amq.direct", routing_key = key}.ok)
      local client = T:client(H.queue("elsewhere"))  -- its own queue does not matter here
      assert.equal("via x", client:call("x", 5, {exchange = "amq.direct", routing_key = key}))
      assert.equal("amq.direct", request.exchange)
      assert.equal(key, request.routing_key)
      -- routing_key alone: the default exchange, where queues are bound by name
      assert.equal("via y", client:call("y", 5, {routing_key = queue}))
      assert.equal("", request.exchange)
      assert.equal(queue, request.routing_key)
      -- nothing bound to that key on the exchange
      local elapsed, reply, message, kind = H.timed(client.call, client, "z", 10,
        {exchange = "amq.direct", routing_key = key .. "-unbound"})
      assert.is_nil(reply)
      assert.equal("no_route", kind)
      assert.is_string(message)
      assert.is_true(elapsed < 1, ("took %.3f s"):format(elapsed))
    end)
  end)

  describe("client:stats", function()
    it("counts calls, replies, remote errors, no_route and timeouts as integers", function()
      local T = H.scope(finally)
      local queue, idle = H.queue("stats"), H.queue("idle")
      assert.is_true(H.amqp1 {op = "declare", queue = idle}.ok)
      T:server(queue, function(body)
        if body == "fail" then error("refused", 0) end
        return body
      end)
      local client = T:client(queue)
      local stats = client:stats()
      for _, name in ipairs {"calls", "replies", "timeouts", "remote_errors", "no_route", "discarded"} do
        assert.equal(0, stats[name], name)
        assert.equal("integer", math.type(stats[name]), name)
      end
      assert.equal("a", client:call("a", 5))
      assert.equal("b", client:call("b", 5))
      assert.equal("remote", select(3, client:call("fail", 5)))
      assert.equal("no_route", select(3, client:call("x", 5, {routing_key = H.queue("nowhere")})))
      assert.equal("timeout", select(3, client:call("x", 0.2, {routing_key = idle})))
      stats = client:stats()
      assert.same({calls = 5, replies = 3, remote_errors = 1, no_route = 1, timeouts = 1, discarded = 0},
        {calls = stats.calls, replies = stats.replies, remote_errors = stats.remote_errors,
         no_route = stats.no_route, timeouts = stats.timeouts, discarded = stats.discarded})
      for _, v in pairs(stats) do
        if type(v) == "number" then assert.equal("integer", math.type(v)) end
      end
    end)
  end)

  local env_it = os.getenv("RPC_URL") and os.getenv("RPC_URL") ~= "" and it or pending
  env_it("connects to env RPC_URL when opts has no url", function()
    local T = H.scope(finally)
    local queue = H.queue("env")
    T:server(queue, function(body) return body end)
    local client = assert(rpc.client(queue))
    T:defer(function() client:close() end)
    assert.equal("env", client:call("env", 5))
  end)
end)
