-- Hostile input: what a raw publisher (pika, through spec/support/amqp_tool.py) can put in a
-- request (headers nested thousands deep or with thousands of keys, binary or missing
-- correlation ids, a reply_to aimed at someone else's queue, bodies past max_body, odd
-- properties), and the client's own size limits. Through all of it the server keeps serving a
-- normal client and never crashes.
local H = require "support.helpers"
local rpc = require "rpc"
local json = require "dkjson"

-- A child server on QUEUE: opts from env SPEC_OPTS (JSON), a handler(body) or, with
-- SPEC_ARITY=2, a handler(body, request). Body "stats" returns server:stats() as JSON plus
-- runs, the handler runs for anything else; body "depth" (arity 2) returns how deep the
-- request's headers.n nest. Replies "echo:" .. body. opts.log writes "log: " lines to stderr.
local CHILD_SERVER = [[
local json = require "dkjson"
local opts = json.decode(os.getenv("SPEC_OPTS") or "{}") or {}
opts.url = URL
opts.log = function(line) io.stderr:write("log: ", line, "\n") end
local runs, server = 0, nil
local function serve(body, request)
  if body == "stats" then
    local stats = server:stats()
    stats.runs = runs
    return json.encode(stats)
  end
  runs = runs + 1
  if body == "depth" then
    local depth, t = 0, request.headers
    while type(t) == "table" and t.n ~= nil do depth, t = depth + 1, t.n end
    return "depth:" .. depth .. ":" .. tostring(t)
  end
  return "echo:" .. body
end
local handler = function(body) return serve(body) end
if os.getenv("SPEC_ARITY") == "2" then
  handler = function(body, request) return serve(body, request) end
end
server = assert(rpc.server(QUEUE, handler, opts))
ready()
print("run:", server:run())
]]

local DEPTHS = {50, 500, 5000}

--- A Lua pattern matching exactly the string s.
local function literal(s)
  return (s:gsub("%p", "%%%0"))
end

--- Starts a child server (arity 1 or 2, opts a JSON-able table) and a normal client of it.
-- Returns an object: stats() (the server's counters, runs included), healthy() (a normal call
-- is served, the child runs and has written nothing but log lines) and stop() (SIGTERM: it
-- must exit 0; then the queue's message count, which must be 0 once every request is acked).
local function child_server(T, queue, arity, opts)
  local child = T:spawn {code = CHILD_SERVER, queue = queue,
                         env = {SPEC_ARITY = tostring(arity), SPEC_OPTS = json.encode(opts or {})}}
  child:wait_ready()
  local client = T:client(queue)
  local srv = {child = child, client = client}

  function srv.stats()
    local reply, message, kind = client:call("stats", 10)
    assert(reply, ("the stats call failed: %s (%s); child output:\n%s")
      :format(tostring(message), tostring(kind), child:output()))
    return json.decode(reply)
  end

  function srv.check_output()
    assert.is_nil(child:status(), "the server exited; its output:\n" .. child:output())
    for line in child:output():gmatch("[^\n]+") do
      assert(line:find("^log: ") or line:find("^run:"), "unexpected output from the server:\n" .. child:output())
    end
  end

  function srv.healthy()
    local reply, message, kind = client:call("still here", 10)
    assert.equal("echo:still here", reply, ("%s (%s)"):format(tostring(message), tostring(kind)))
    srv.check_output()
  end

  function srv.stop()
    srv.check_output()
    child:kill("TERM")
    local status = child:wait(5)
    assert.equal(0, status, "the server did not exit 0 on SIGTERM; its output:\n" .. child:output())
    assert.matches("run:%s+true", child:output())
    return H.amqp1({op = "count", queue = queue}).messages
  end

  return srv
end

--- The replies for n requests from queue replies (one pika run), in order.
local function get_replies(replies, n, timeout)
  local ops = {}
  for i = 1, n do ops[i] = {op = "get", queue = replies, timeout = timeout or 5} end
  return H.amqp(ops)
end

--- Checks that reply is the error reply of a request refused as too_large.
local function assert_too_large_reply(reply, pattern, what)
  assert.is_nil(reply.empty, "no reply for " .. what)
  local headers = reply.properties.headers
  assert.is_table(headers, "an error reply has headers: " .. what)
  assert.equal("too_large", headers["x-rpc-error-kind"], what)
  assert.is_string(headers["x-rpc-error"], what)
  assert.matches(pattern, headers["x-rpc-error"])
  assert.equal(headers["x-rpc-error"], reply.body, what)
end

local function unhex(hex)
  return (hex:gsub("%x%x", function(h) return string.char(tonumber(h, 16)) end))
end

local function tohex(s)
  return (s:gsub(".", function(c) return ("%02x"):format(c:byte()) end))
end

--- n random bytes with a NUL first, one in the middle, and a 0xff.
local function binary(n)
  local bytes = unhex(H.hex(n))
  return "\0" .. bytes:sub(2, n // 2) .. "\0" .. bytes:sub(n // 2 + 2, n - 1) .. "\255"
end

--- Queues and exchanges a test names itself (H.queue cannot make them), deleted at its end.
local function scratch(T, queues, exchanges)
  T:defer(function()
    local ops = {}
    for _, q in ipairs(queues or {}) do ops[#ops + 1] = {op = "delete", queue = q} end
    for _, x in ipairs(exchanges or {}) do ops[#ops + 1] = {op = "delete_exchange", exchange = x} end
    H.amqp(ops)
  end)
end

--- Polls server until cond(server:stats()) holds.
local function poll_until(server, cond, what)
  H.wait_until(function()
    server:poll(0.2)
    return cond(server:stats())
  end, 10, what)
end

--- A name of exactly n bytes starting with prefix (random, so unique).
local function long_name(prefix, n)
  local name = prefix .. H.hex(8)
  return name .. string.rep("n", n - #name)
end

describe("a server fed hostile requests", function()
  teardown(H.cleanup)

  describe("deeply nested headers", function()
    it("are served normally by a handler(body): 50, 500 and 5,000 levels, tables and arrays", function()
      local T = H.scope(finally)
      local queue, replies = H.queue("nested-body"), H.queue("replies")
      local srv = child_server(T, queue, 1, {reply_to_allow = literal(replies)})
      local ops, n = {{op = "declare", queue = replies}}, 0
      for _, depth in ipairs(DEPTHS) do
        for _, array in ipairs {false, true} do
          n = n + 1
          ops[#ops + 1] = {op = "publish", routing_key = queue, body = "deep" .. n,
                           headers_nested = depth, headers_array = array,
                           properties = {reply_to = replies, correlation_id = "nested-" .. n}}
        end
      end
      local results = H.amqp(ops)
      local got = get_replies(replies, n)
      for i = 1, n do
        local reply = got[i]
        assert.is_nil(reply.empty, "no reply for request " .. i)
        assert.equal("nested-" .. i, reply.properties.correlation_id)
        assert.equal("echo:deep" .. i, reply.body)
        assert.is_nil((reply.properties.headers or {})["x-rpc-error"], "an error reply for request " .. i)
      end
      for i, result in ipairs(results) do assert.is_true(result.ok, "operation " .. i) end
      local stats = srv.stats()
      assert.equal(n, stats.runs)
      assert.equal(0, stats.too_large)
      assert.equal(0, stats.errors)
      assert.equal(0, stats.reconnects)
      assert.is_true(stats.connected)
      srv.healthy()
      assert.equal(0, srv.stop(), "requests left unacked")
    end)

    it("are refused as too_large to a handler(body, request), which never runs; acked, counted", function()
      local T = H.scope(finally)
      local queue, replies = H.queue("nested-request"), H.queue("replies")
      local srv = child_server(T, queue, 2, {reply_to_allow = literal(replies)})
      local ops, n = {{op = "declare", queue = replies}}, 0
      for _, depth in ipairs(DEPTHS) do
        for _, array in ipairs {false, true} do
          n = n + 1
          ops[#ops + 1] = {op = "publish", routing_key = queue, body = "deep" .. n,
                           headers_nested = depth, headers_array = array,
                           properties = {reply_to = replies, correlation_id = "nested-" .. n}}
        end
      end
      H.amqp(ops)
      local got = get_replies(replies, n)
      for i = 1, n do
        assert_too_large_reply(got[i], "header", "request " .. i)
        assert.equal("nested-" .. i, got[i].properties.correlation_id)
      end
      local stats = srv.stats()
      assert.equal(0, stats.runs, "the handler ran")
      assert.equal(n, stats.too_large)
      assert.equal(0, stats.reconnects)
      -- flat headers well within the caps are served
      local reply, message, kind = srv.client:call("x", 10, {headers = {tenant = "acme"}})
      assert.equal("echo:x", reply, ("%s (%s)"):format(tostring(message), tostring(kind)))
      srv.healthy()
      assert.equal(0, srv.stop(), "requests left unacked")
    end)

    it("within the caps reach a handler(body, request) converted", function()
      local T = H.scope(finally)
      local queue, replies = H.queue("nested-ok"), H.queue("replies")
      local srv = child_server(T, queue, 2, {reply_to_allow = literal(replies)})
      H.amqp {
        {op = "declare", queue = replies},
        {op = "publish", routing_key = queue, body = "depth", headers_nested = 8,
         properties = {reply_to = replies, correlation_id = "eight"}},
      }
      local reply = get_replies(replies, 1)[1]
      assert.equal("depth:9:leaf", reply.body)  -- headers.n, then 8 tables down to "leaf"
      assert.equal(0, srv.stats().too_large)
      srv.healthy()
    end)
  end)

  describe("10,000 header keys", function()
    it("are served normally by a handler(body)", function()
      local T = H.scope(finally)
      local queue, replies = H.queue("keys-body"), H.queue("replies")
      local srv = child_server(T, queue, 1, {reply_to_allow = literal(replies)})
      H.amqp {
        {op = "declare", queue = replies},
        {op = "publish", routing_key = queue, body = "many", headers_keys = 10000,
         properties = {reply_to = replies, correlation_id = "many"}},
      }
      local reply = get_replies(replies, 1)[1]
      assert.equal("echo:many", reply.body)
      assert.equal("many", reply.properties.correlation_id)
      local stats = srv.stats()
      assert.equal(1, stats.runs)
      assert.equal(0, stats.too_large)
      assert.equal(0, stats.reconnects)
      srv.healthy()
      assert.equal(0, srv.stop(), "requests left unacked")
    end)

    it("are refused as too_large to a handler(body, request); 1,024 keys are served, 1,025 refused", function()
      local T = H.scope(finally)
      local queue, replies = H.queue("keys-request"), H.queue("replies")
      local srv = child_server(T, queue, 2, {reply_to_allow = literal(replies)})
      H.amqp {
        {op = "declare", queue = replies},
        {op = "publish", routing_key = queue, body = "many", headers_keys = 10000,
         properties = {reply_to = replies, correlation_id = "many"}},
        {op = "publish", routing_key = queue, body = "1024", headers_keys = 1024,
         properties = {reply_to = replies, correlation_id = "1024"}},
        {op = "publish", routing_key = queue, body = "1025", headers_keys = 1025,
         properties = {reply_to = replies, correlation_id = "1025"}},
      }
      local got = get_replies(replies, 3)
      assert_too_large_reply(got[1], "header", "10,000 keys")
      assert.equal("many", got[1].properties.correlation_id)
      assert.equal("echo:1024", got[2].body)
      assert.is_nil((got[2].properties.headers or {})["x-rpc-error"])
      assert_too_large_reply(got[3], "header", "1,025 keys")
      assert.equal("1025", got[3].properties.correlation_id)
      local stats = srv.stats()
      assert.equal(1, stats.runs, "the handler ran for a refused request")
      assert.equal(2, stats.too_large)
      assert.equal(0, stats.reconnects)
      srv.healthy()
      assert.equal(0, srv.stop(), "requests left unacked")
    end)
  end)

  describe("correlation ids", function()
    it("a binary one (255 bytes with NULs) and a missing one are served, the reply carries the same bytes or none", function()
      local T = H.scope(finally)
      local queue, replies = H.queue("binary-cid"), H.queue("replies")
      local seen = {}
      local server = T:server(queue, function(body, request)
        seen[body] = request.correlation_id or false
        return "echo:" .. body
      end, {reply_to_allow = literal(replies)})
      local cid = binary(255)
      assert.equal(255, #cid)
      H.amqp {
        {op = "declare", queue = replies},
        {op = "publish", routing_key = queue, body = "binary",
         properties = {reply_to = replies}, properties_hex = {correlation_id = tohex(cid)}},
        {op = "publish", routing_key = queue, body = "none", properties = {reply_to = replies}},
      }
      poll_until(server, function(s) return s.replies == 2 end, "two replies")
      assert.equal(cid, seen.binary)
      assert.is_false(seen.none)
      local got = get_replies(replies, 2)
      assert.equal("echo:binary", got[1].body)
      assert.equal(tohex(cid), got[1].hex.correlation_id)
      assert.equal("echo:none", got[2].body)
      assert.is_nil(got[2].properties.correlation_id)
      assert.is_nil(got[2].hex.correlation_id)
      assert.equal("echo:after", T:client(queue):call("after", 5))
      assert.equal(0, server:stats().errors)
    end)
  end)

  describe("reply_to", function()
    it("absent: the handler runs, the request is acked, no_reply_to counts it", function()
      local T = H.scope(finally)
      local queue = H.queue("no-reply-to")
      local runs = {}
      local server = T:server(queue, function(body) runs[#runs + 1] = body; return "unused" end)
      H.amqp1 {op = "publish", routing_key = queue, body = "nobody listens"}
      poll_until(server, function(s) return s.no_reply_to == 1 end, "the request")
      assert.same({"nobody listens"}, runs)
      local stats = server:stats()
      assert.equal(0, stats.replies)
      assert.equal(0, stats.refused_reply_to)
      assert.equal("unused", T:client(queue):call("x", 5))
      server:close()
      assert.equal(0, H.amqp1({op = "count", queue = queue}).messages, "the request was not acked")
    end)

    it("naming a queue nobody allowed: the victim stays empty, the handler never runs, acked, refused_reply_to counts it", function()
      local T = H.scope(finally)
      local queue, victim = H.queue("victim-server"), H.queue("victim")
      local runs, lines = 0, {}
      local server = T:server(queue, function(body) runs = runs + 1; return "spam:" .. body end,
                              {log = function(line) lines[#lines + 1] = line end})
      local stats = server:stats()
      for _, name in ipairs {"refused_reply_to", "too_large"} do
        assert.equal(0, stats[name], name)
        assert.equal("integer", math.type(stats[name]), name)
      end
      H.amqp {
        {op = "declare", queue = victim},
        {op = "publish", routing_key = queue, body = "flood the victim",
         properties = {reply_to = victim, correlation_id = "victim-1"}},
        {op = "publish", routing_key = queue, body = "again",
         properties = {reply_to = victim, correlation_id = "victim-2"}},
        {op = "publish", routing_key = queue, body = "binary name",  -- a name no queue has
         properties_hex = {reply_to = tohex(binary(255))}},
      }
      poll_until(server, function(s) return s.refused_reply_to == 3 end, "three refused requests")
      assert.equal(0, runs, "the handler ran")
      stats = server:stats()
      assert.equal(0, stats.replies)
      assert.equal(0, stats.too_large)
      assert.equal(0, stats.errors)
      assert.is_true(#lines >= 1, "opts.log was told nothing")
      for _, line in ipairs(lines) do
        assert.is_string(line)
        assert.is_nil(line:find("[%z\1-\31\127]"), ("a control character in the log line %q"):format(line))
      end
      -- prefetch 1: the next request only comes once the refused ones are acked
      assert.equal("spam:fine", T:client(queue):call("fine", 5))
      assert.equal(1, runs)
      assert.equal(0, H.amqp1({op = "count", queue = victim}).messages, "the victim got messages")
      server:close()
      assert.equal(0, H.amqp1({op = "count", queue = queue}).messages, "a refused request was not acked")
    end)

    it("amq.rabbitmq.reply-to.bogus and an amq.gen- queue that does not exist do not cost the server its connection", function()
      local T = H.scope(finally)
      local queue = H.queue("bogus-reply-to")
      local srv = child_server(T, queue, 1)
      H.amqp {
        {op = "publish", routing_key = queue, body = "bogus",
         properties = {reply_to = "amq.rabbitmq.reply-to.bogus", correlation_id = "b1"}},
        {op = "publish", routing_key = queue, body = "gen",
         properties = {reply_to = "amq.gen-" .. H.hex(11), correlation_id = "b2"}},
        {op = "publish", routing_key = queue, body = "bogus2",
         properties = {reply_to = "amq.rabbitmq.reply-to.", correlation_id = "b3"}},
      }
      srv.healthy()
      srv.healthy()
      local stats = srv.stats()
      assert.equal(0, stats.reconnects)
      assert.is_true(stats.connected)
      assert.equal(0, stats.errors)
      assert.is_true(stats.runs >= 4, "runs " .. stats.runs)  -- bogus, gen and the two healthy calls
      srv.healthy()
      assert.equal(0, srv.stop(), "requests left unacked")
    end)

    it("reply_to_allow as a string must match the whole name", function()
      local T = H.scope(finally)
      local queue, allowed = H.queue("allow-string"), H.queue("rpc_replies")
      local longer, prefixed = allowed .. "2", "x" .. allowed
      scratch(T, {longer, prefixed})
      local runs = 0
      local server = T:server(queue, function(body) runs = runs + 1; return "for:" .. body end,
                              {reply_to_allow = literal(allowed)})
      local ops = {}
      for _, name in ipairs {allowed, longer, prefixed} do
        ops[#ops + 1] = {op = "declare", queue = name}
        ops[#ops + 1] = {op = "publish", routing_key = queue, body = name, properties = {reply_to = name}}
      end
      H.amqp(ops)
      poll_until(server, function(s) return s.replies == 1 and s.refused_reply_to == 2 end,
                 "one reply, two refusals")
      assert.equal(1, runs)
      local results = H.amqp {
        {op = "get", queue = allowed, timeout = 5},
        {op = "count", queue = longer},
        {op = "count", queue = prefixed},
      }
      assert.equal("for:" .. allowed, results[1].body)
      assert.equal(0, results[2].messages, allowed .. "2 got a reply")
      assert.equal(0, results[3].messages, "x" .. allowed .. " got a reply")
      assert.equal("for:ok", T:client(queue):call("ok", 5))
      server:close()
      assert.equal(0, H.amqp1({op = "count", queue = queue}).messages)
    end)

    it("reply_to_allow as a list allows what any pattern matches whole; direct and exclusive clients always work", function()
      local T = H.scope(finally)
      local queue = H.queue("allow-list")
      local a, b, c = H.queue("allow-a"), H.queue("allow-b"), H.queue("allow-c")
      local runs = 0
      local server = T:server(queue, function(body) runs = runs + 1; return "for:" .. body end,
                              {reply_to_allow = {literal(a), "spec%-allow%-b%-%x+"}})
      local ops = {}
      for _, name in ipairs {a, b, c} do
        ops[#ops + 1] = {op = "declare", queue = name}
        ops[#ops + 1] = {op = "publish", routing_key = queue, body = name, properties = {reply_to = name}}
      end
      H.amqp(ops)
      poll_until(server, function(s) return s.replies == 2 and s.refused_reply_to == 1 end,
                 "two replies, one refusal")
      assert.equal(2, runs)
      local results = H.amqp {
        {op = "get", queue = a, timeout = 5},
        {op = "get", queue = b, timeout = 5},
        {op = "count", queue = c},
      }
      assert.equal("for:" .. a, results[1].body)
      assert.equal("for:" .. b, results[2].body)
      assert.equal(0, results[3].messages, "a refused name got a reply")
      assert.equal("for:direct", T:client(queue):call("direct", 5))
      assert.equal("for:exclusive", T:client(queue, {reply_to = "exclusive"}):call("exclusive", 5))
      assert.equal(1, server:stats().refused_reply_to)
    end)

    it("a client with a named reply queue works through a server that allows it, and times out at one that does not", function()
      local T = H.scope(finally)
      local qa, qb = H.queue("named-allowed"), H.queue("named-refused")
      local named, other = H.queue("named-replies"), H.queue("named-other")
      local runs = 0
      local handler = function(body) runs = runs + 1; return "named:" .. body end
      local allowing = T:server(qa, handler, {reply_to_allow = literal(named)})
      local refusing = T:server(qb, handler)
      assert.equal("named:hello", T:client(qa, {reply_to = named}):call("hello", 5))
      assert.equal(1, allowing:stats().replies)
      local reply, message, kind = T:client(qb, {reply_to = other}):call("lost", 1)
      assert.is_nil(reply)
      assert.equal("timeout", kind, message)
      assert.equal(1, runs)
      local stats = refusing:stats()
      assert.equal(1, stats.refused_reply_to)
      assert.equal(0, stats.replies)
      assert.equal("named:direct", T:client(qb):call("direct", 5))
    end)
  end)

  describe("bodies past the server's max_body", function()
    it("get an error reply of kind too_large, the handler never runs, acked; a client sees nil, message, 'too_large'", function()
      local T = H.scope(finally)
      local queue, replies = H.queue("max-body"), H.queue("replies")
      local sizes = {}
      local server = T:server(queue, function(body) sizes[#sizes + 1] = #body; return body end,
                              {max_body = 1024, reply_to_allow = literal(replies)})
      H.amqp {
        {op = "declare", queue = replies},
        {op = "publish", routing_key = queue, body_size = 1024,
         properties = {reply_to = replies, correlation_id = "at"}},
        {op = "publish", routing_key = queue, body_size = 1025,
         properties = {reply_to = replies, correlation_id = "over"}},
        {op = "publish", routing_key = queue, body_size = 300000,  -- several frames
         properties = {reply_to = replies, correlation_id = "huge"}},
        {op = "publish", routing_key = queue, body_size = 5000},    -- nobody to tell
      }
      poll_until(server, function(s) return s.too_large == 3 end, "three refused requests")
      assert.same({1024}, sizes)
      local got = get_replies(replies, 3)
      assert.equal("at", got[1].properties.correlation_id)
      assert.equal(string.rep("x", 1024), got[1].body)
      assert_too_large_reply(got[2], "max_body", "1,025 bytes")
      assert.matches("1025", got[2].body)
      assert.equal("over", got[2].properties.correlation_id)
      assert_too_large_reply(got[3], "max_body", "300,000 bytes")
      assert.equal("huge", got[3].properties.correlation_id)

      local client = T:client(queue)
      local reply, message, kind = client:call(string.rep("y", 2000), 5)
      assert.is_nil(reply)
      assert.equal("too_large", kind)
      assert.matches("max_body", message)
      assert.equal(0, client:stats().timeouts)
      assert.same({1024}, sizes)
      assert.equal(4, server:stats().too_large)
      assert.equal("small", client:call("small", 5))
      server:close()
      assert.equal(0, H.amqp1({op = "count", queue = queue}).messages, "a refused request was not acked")
    end)
  end)

  describe("the server's default max_body", function()
    it("is 16 MiB: 16,777,216 bytes are served, one more is refused as too_large", function()
      local T = H.scope(finally)
      local queue, replies = H.queue("default-max"), H.queue("replies")
      local sizes = {}
      local server = T:server(queue, function(body) sizes[#sizes + 1] = #body; return #body end,
                              {reply_to_allow = literal(replies)})
      H.amqp {
        {op = "declare", queue = replies},
        {op = "publish", routing_key = queue, body_size = 16777216, properties = {reply_to = replies}},
        {op = "publish", routing_key = queue, body_size = 16777217, properties = {reply_to = replies}},
      }
      poll_until(server, function(s) return s.replies == 2 end, "two replies")
      assert.same({16777216}, sizes)
      local got = get_replies(replies, 2)
      assert.equal("16777216", got[1].body)
      assert_too_large_reply(got[2], "max_body", "16 MiB + 1")
      assert.equal(1, server:stats().too_large)
    end)
  end)

  describe("odd properties", function()
    it("an empty, a 255-byte and a binary content_type are served and reach the handler as sent", function()
      local T = H.scope(finally)
      local queue, replies = H.queue("content-type"), H.queue("replies")
      local seen = {}
      local server = T:server(queue, function(body, request)
        seen[body] = request.content_type
        return "ct:" .. body
      end, {reply_to_allow = literal(replies)})
      local long, bin = string.rep("c", 255), binary(255)
      H.amqp {
        {op = "declare", queue = replies},
        {op = "publish", routing_key = queue, body = "empty", properties = {reply_to = replies, content_type = ""}},
        {op = "publish", routing_key = queue, body = "long", properties = {reply_to = replies, content_type = long}},
        {op = "publish", routing_key = queue, body = "binary",
         properties = {reply_to = replies}, properties_hex = {content_type = tohex(bin)}},
      }
      poll_until(server, function(s) return s.replies == 3 end, "three replies")
      assert.equal("", seen.empty)
      assert.equal(long, seen.long)
      assert.equal(bin, seen.binary)
      local got = get_replies(replies, 3)
      assert.equal("ct:empty", got[1].body)
      assert.equal("ct:long", got[2].body)
      assert.equal("ct:binary", got[3].body)
      assert.equal(0, server:stats().errors)
      assert.equal("ct:after", T:client(queue):call("after", 5))
    end)
  end)
end)

describe("a client's limits", function()
  teardown(H.cleanup)

  describe("opts.max_body", function()
    it("refuses a request body over it with nil, message, 'too_large' and publishes nothing", function()
      local T = H.scope(finally)
      local queue = H.queue("client-max")
      assert.is_true(H.amqp1({op = "declare", queue = queue}).ok)
      local client = T:client(queue, {max_body = 100})
      local big = string.rep("z", 101)
      local elapsed, reply, message, kind = H.timed(client.call, client, big, 5)
      assert.is_nil(reply)
      assert.equal("too_large", kind)
      assert.matches("request body of 101 bytes is over max_body %(100%)", message)
      assert.is_true(elapsed < 1, ("the refusal took %.2f s"):format(elapsed))
      local id
      id, message, kind = client:send(big)
      assert.is_nil(id)
      assert.equal("too_large", kind)
      assert.matches("max_body %(100%)", message)
      local replies
      replies, message, kind = client:call_all({"fits", big}, 5)
      assert.is_nil(replies)
      assert.equal("too_large", kind)
      assert.matches("request 2 of 2", message)
      assert.matches("max_body %(100%)", message)
      assert.equal(0, H.amqp1({op = "count", queue = queue}).messages, "something was published")
      T:server(queue, function(body) return #body end)
      assert.equal("100", client:call(string.rep("z", 100), 5))
    end)

    it("fails a call whose reply is over it with 'too_large', and the next call works", function()
      local T = H.scope(finally)
      local queue = H.queue("client-max-reply")
      T:server(queue, function(body) return string.rep("r", tonumber(body)) end)
      local client = T:client(queue, {max_body = 1024})
      assert.equal(string.rep("r", 1024), client:call("1024", 5))
      for _, size in ipairs {1025, 300000} do
        local reply, message, kind = client:call(tostring(size), 5)
        assert.is_nil(reply)
        assert.equal("too_large", kind, message)
        assert.matches("max_body", message)
        assert.equal("rrr", client:call("3", 5))
      end
      assert.equal(0, client:stats().timeouts)
    end)
  end)

  describe("property sizes in callopts", function()
    it("a 256-byte content_type is a bad argument, 255 bytes work", function()
      local T = H.scope(finally)
      local queue = H.queue("ct-size")
      T:server(queue, function(_, request) return request.content_type end)
      local client = T:client(queue)
      local err = H.error_of(function() local r = client:call("x", 5, {content_type = string.rep("t", 256)}); return r end)
      assert.matches("bad argument #3 to 'call'", err, 1, true)
      assert.matches("content_type", err, 1, true)
      local ct = string.rep("t", 255)
      assert.equal(ct, client:call("x", 5, {content_type = ct}))
    end)

    it("a 256-byte header key is a bad argument, 255 bytes work", function()
      local T = H.scope(finally)
      local queue = H.queue("key-size")
      local key = string.rep("k", 255)
      T:server(queue, function(_, request) return request.headers[key] end)
      local client = T:client(queue)
      local err = H.error_of(function()
        local r = client:call("x", 5, {headers = {[string.rep("k", 256)] = "v"}}); return r
      end)
      assert.matches("bad argument #3 to 'call'", err, 1, true)
      assert.matches("255", err, 1, true)
      assert.equal("v", client:call("x", 5, {headers = {[key] = "v"}}))
    end)

    it("a 256-byte exchange is a bad argument, 255 bytes work", function()
      local T = H.scope(finally)
      local queue = H.queue("exchange-size")
      local exchange = long_name("spec-exchange-", 255)
      scratch(T, nil, {exchange})
      T:server(queue, function(body) return "via:" .. body end)
      local results = H.amqp {
        {op = "declare_exchange", exchange = exchange},
        {op = "bind", queue = queue, exchange = exchange, routing_key = queue},
      }
      assert.is_true(results[1].ok, results[1].text)
      assert.is_true(results[2].ok, results[2].text)
      local client = T:client(queue)
      local err = H.error_of(function()
        local r = client:call("x", 5, {exchange = exchange .. "x"}); return r
      end)
      assert.matches("bad argument #3 to 'call'", err, 1, true)
      assert.matches("exchange", err, 1, true)
      assert.equal("via:x", client:call("x", 5, {exchange = exchange}))
    end)

    it("a 256-byte routing_key is a bad argument, 255 bytes work", function()
      local T = H.scope(finally)
      local queue = long_name("spec-routing-", 255)
      scratch(T, {queue})
      T:server(queue, function(_, request) return #request.routing_key end)
      local client = T:client(H.queue("routing-size"))
      local err = H.error_of(function()
        local r = client:call("x", 5, {routing_key = queue .. "x"}); return r
      end)
      assert.matches("bad argument #3 to 'call'", err, 1, true)
      assert.matches("routing_key", err, 1, true)
      assert.equal("255", client:call("x", 5, {routing_key = queue}))
    end)
  end)
end)
