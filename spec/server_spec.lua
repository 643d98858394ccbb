-- rpc.server, server:poll/run/stop, rpc.serve: handler errors, request fields, requests without
-- reply_to, signals, redelivery after a crash, queue options.
local H = require "support.helpers"
local rpc = require "rpc"

-- A child echo server; a body "sleep S rest" first touches "started", sleeps S seconds, and
-- replies "done:" .. rest. Prints what run() returned.
local CHILD_SERVER = [[
local server = assert(rpc.server(QUEUE, function(body)
  local seconds, rest = body:match("^sleep (%S+) (.*)$")
  if not seconds then return body end
  touch("started")
  sleep(tonumber(seconds))
  return "done:" .. rest
end, {url = URL, reply_to_allow = "spec%-replies%-%x+"}))  -- the specs' named reply queues
ready()
print("run:", server:run())
server:close()
print("closed")
]]

-- The same, through rpc.serve.
local CHILD_SERVE = [[
touch("ready")  -- serve declares before it blocks; the spec pings it before relying on that
print("serve:", rpc.serve(QUEUE, function(body) return body end, {url = URL}))
]]

--- Waits until the child's server answers: then it is in run() (or serve()), its loop going.
local function ping(T, queue)
  local client = T:client(queue)
  local reply
  H.wait_until(function()
    reply = client:call("ping", 1)
    return reply
  end, 10, "the child server to answer")
  assert.equal("ping", reply)
  return client
end

describe("rpc.server", function()
  teardown(H.cleanup)

  describe("a handler that raises", function()
    it("gives the caller nil, the error text, 'remote', and the server serves the next request", function()
      local T = H.scope(finally)
      local queue = H.queue("boom")
      local server = T:server(queue, function(body)
        if body == "boom" then error("boom: the handler failed") end
        return "fine " .. body
      end)
      local client = T:client(queue)
      local reply, message, kind = client:call("boom", 5)
      assert.is_nil(reply)
      assert.equal("remote", kind)
      assert.is_string(message)
      assert.matches("boom: the handler failed", message, 1, true)
      assert.equal("fine again", client:call("again", 5))
      local stats = server:stats()
      assert.equal(2, stats.requests)
      assert.equal(1, stats.errors)
      assert.equal(2, stats.replies)
      assert.equal(1, client:stats().remote_errors)
    end)

    it("replies with header x-rpc-error and the message as body, and acks", function()
      local T = H.scope(finally)
      local queue, replies = H.queue("boom"), H.queue("replies")
      local server = T:server(queue, function() error("kaboom", 0) end, {reply_to_allow = replies})
      H.amqp {
        {op = "declare", queue = replies},
        {op = "publish", routing_key = queue, body = "x",
         properties = {reply_to = replies, correlation_id = "cid-boom"}},
      }
      H.wait_until(function() return server:poll(0.5) == 1 end, 5, "the request")
      local reply = H.amqp1 {op = "get", queue = replies, timeout = 5}
      assert.is_nil(reply.empty, "no reply arrived")
      assert.equal("cid-boom", reply.properties.correlation_id)
      assert.is_table(reply.properties.headers)
      assert.matches("kaboom", reply.properties.headers["x-rpc-error"], 1, true)
      assert.matches("kaboom", reply.body, 1, true)
      server:close()
      local info = H.amqp1 {op = "count", queue = queue}
      assert.equal(0, info.messages, "the failed request was not acked")
    end)

    it("gives 'remote' with a message for an error value that is not a string", function()
      local T = H.scope(finally)
      local queue = H.queue("boom-table")
      T:server(queue, function() error({code = 42}) end)
      local reply, message, kind = T:client(queue):call("x", 5)
      assert.is_nil(reply)
      assert.equal("remote", kind)
      assert.is_string(message)
      assert.is_true(#message > 0)
    end)
  end)

  describe("a handler that returns neither a string nor a number", function()
    for _, case in ipairs {
      {"nil", function() return nil end},
      {"nothing", function() end},
      {"a table", function() return {} end},
      {"a boolean", function() return true end},
      {"a function", function() return print end},
    } do
      it("gives 'remote' when it returns " .. case[1], function()
        local T = H.scope(finally)
        local queue = H.queue("bad-return")
        local server = T:server(queue, case[2])
        local client = T:client(queue)
        local reply, message, kind = client:call("x", 5)
        assert.is_nil(reply)
        assert.equal("remote", kind)
        assert.is_string(message)
        assert.equal(1, server:stats().errors)
      end)
    end
  end)

  it("gives the handler a request table with correlation_id, reply_to, redelivered, routing_key, exchange", function()
    local T = H.scope(finally)
    local queue = H.queue("fields")
    local requests = {}
    T:server(queue, function(body, request) requests[#requests + 1] = request; return body end)
    local client = T:client(queue)
    assert.equal("a", client:call("a", 5))
    assert.equal("b", client:call("b", 5))
    local r = requests[1]
    assert.is_table(r)
    assert.matches(H.UUID, r.correlation_id)
    assert.are_not.equal(r.correlation_id, requests[2].correlation_id)
    assert.matches("^amq%.rabbitmq%.reply%-to", r.reply_to)
    assert.is_false(r.redelivered)
    assert.equal(queue, r.routing_key)
    assert.equal("", r.exchange)
    assert.is_nil(r.content_type)
    local names = {}
    for k in pairs(r.headers or {}) do names[#names + 1] = k end
    assert.same({"x-rpc-deadline"}, names, "headers nobody sent but the deadline")
    assert.is_number(r.deadline)
  end)

  it("handles and acks a request without reply_to, sending no reply", function()
    local T = H.scope(finally)
    local queue = H.queue("no-reply-to")
    local got
    local server = T:server(queue, function(body) got = body; return "unused" end)
    H.amqp1 {op = "publish", routing_key = queue, body = "fire and forget"}
    H.wait_until(function() return server:poll(0.5) == 1 end, 5, "the request")
    assert.equal("fire and forget", got)
    local stats = server:stats()
    assert.equal(1, stats.requests)
    assert.equal(1, stats.no_reply_to)
    assert.equal(0, stats.replies)
    assert.equal(0, stats.errors)
    server:close()  -- an unacked request would now go back to the queue
    local info = H.amqp1 {op = "count", queue = queue}
    assert.is_true(info.ok)
    assert.equal(0, info.messages, "the request was not acked")
    assert.equal(0, info.consumers)
  end)

  describe("server:poll", function()
    it("returns 0 at once when nothing waits, and after its timeout when nothing comes", function()
      local T = H.scope(finally)
      local server = T:server(H.queue("poll-idle"), function(body) return body end)
      local elapsed, n = H.timed(server.poll, server)
      assert.equal(0, n)
      assert.equal("integer", math.type(n))
      assert.is_true(elapsed < 0.2, ("poll() took %.3f s"):format(elapsed))
      elapsed, n = H.timed(server.poll, server, 0.4)
      assert.equal(0, n)
      assert.is_true(elapsed >= 0.4 - 0.01 and elapsed < 0.4 + 0.5, ("poll(0.4) took %.3f s"):format(elapsed))
    end)

    it("returns the number of requests it handled, as soon as it handled some", function()
      local T = H.scope(finally)
      local queue = H.queue("poll")
      local bodies = {}
      local server = T:server(queue, function(body) bodies[#bodies + 1] = body; return body end)
      H.amqp1 {op = "publish", routing_key = queue, body = "one"}
      local elapsed, n = H.timed(server.poll, server, 5)
      assert.equal(1, n)
      assert.is_true(elapsed < 2, ("poll(5) took %.3f s for a waiting request"):format(elapsed))
      H.amqp {
        {op = "publish", routing_key = queue, body = "two"},
        {op = "publish", routing_key = queue, body = "three"},
        {op = "publish", routing_key = queue, body = "four"},
      }
      local total = 0
      H.wait_until(function()
        local got = server:poll(0.5)
        assert.equal("integer", math.type(got))
        total = total + got
        return total >= 3
      end, 10, "three requests")
      assert.equal(3, total)
      assert.same({"one", "two", "three", "four"}, bodies)
      assert.equal(0, server:poll())
      assert.equal(4, server:stats().requests)
    end)

    it("counts only the requests of its own server", function()
      local T = H.scope(finally)
      local qa, qb = H.queue("poll-a"), H.queue("poll-b")
      local a = T:server(qa, function(body) return body end)
      local b = T:server(qb, function(body) return body end)
      H.amqp1 {op = "publish", routing_key = qb, body = "for b"}
      assert.equal(0, a:poll(0.5))
      H.wait_until(function()
        b:poll(0.2)
        return b:stats().requests == 1
      end, 5, "b to handle its request")
      assert.equal(0, a:stats().requests)
    end)
  end)

  describe("server:run", function()
    it("returns true after the request in hand when the handler calls server:stop()", function()
      local T = H.scope(finally)
      local queue, replies = H.queue("stop"), H.queue("replies")
      local server
      server = T:server(queue, function(body)
        if body == "stop" then server:stop() end
        return "ok:" .. body
      end, {reply_to_allow = replies})
      H.amqp {
        {op = "declare", queue = replies},
        {op = "publish", routing_key = queue, body = "a", properties = {reply_to = replies}},
        {op = "publish", routing_key = queue, body = "stop", properties = {reply_to = replies}},
        {op = "publish", routing_key = queue, body = "after", properties = {reply_to = replies}},
      }
      local watchdog = T:watchdog(15)   -- SIGTERM ends run() should stop() not
      local elapsed, ok, message, kind = H.timed(server.run, server)
      watchdog:stop()
      assert.is_true(ok, message, kind)
      assert.is_true(elapsed < 10, ("run() returned after %.1f s, on the watchdog's signal"):format(elapsed))
      assert.equal(2, server:stats().requests)
      local results = H.amqp {
        {op = "get", queue = replies, timeout = 5},
        {op = "get", queue = replies, timeout = 5},
      }
      assert.equal("ok:a", results[1].body)
      assert.equal("ok:stop", results[2].body)
      server:close()
      H.wait_until(function()
        return H.amqp1 {op = "count", queue = queue}.messages == 1
      end, 5, "the request after stop to stay in the queue")
    end)

    it("returns nil, message, 'closed' on a closed server", function()
      local T = H.scope(finally)
      local server = T:server(H.queue("closed"), function(body) return body end)
      server:close()
      local ok, message, kind = server:run()
      assert.is_nil(ok)
      assert.equal("closed", kind)
      assert.matches("closed", message)
    end)

    for _, sig in ipairs {"INT", "TERM"} do
      it("returns true when the process gets SIG" .. sig .. " while idle, and the process exits 0 well within 1 s", function()
        local T = H.scope(finally)
        local queue = H.queue("sig" .. sig:lower())
        local child = T:spawn {code = CHILD_SERVER, queue = queue}
        child:wait_ready()
        ping(T, queue)
        local t0 = H.now()
        child:kill(sig)
        local status = child:wait(2)
        assert.is_true(H.now() - t0 < 0.8, ("exited %.3f s after SIG%s"):format(H.now() - t0, sig))
        assert.is_not_nil(status, "still running 2 s after SIG" .. sig .. "; output:\n" .. child:output())
        assert.equal(0, status, child:output())
        assert.matches("run:%s+true", child:output())
        assert.matches("closed", child:output())
      end)
    end

    it("finishes and replies to the request in hand when SIGTERM comes during the handler", function()
      local T = H.scope(finally)
      local queue = H.queue("sigterm-busy")
      local child = T:spawn {code = CHILD_SERVER, queue = queue}
      child:wait_ready()
      local client = ping(T, queue)
      -- once the handler has started, SIGTERM the server
      local killer = T:spawn {sh = ("while [ ! -e %s ]; do sleep 0.02; done; kill -TERM %d; touch %s")
        :format(H.quote(child.dir .. "/started"), child.pid, H.quote(child.dir .. "/signalled"))}
      local reply, message, kind = client:call("sleep 1 job", 10)
      assert.equal("done:job", reply, message, kind)
      assert.is_not_nil(killer:wait(5), "the signal was not sent")
      assert.is_true(child:file_exists("signalled"))
      local status = child:wait(3)
      assert.is_not_nil(status, "still running after SIGTERM; output:\n" .. child:output())
      assert.equal(0, status, child:output())
      assert.matches("run:%s+true", child:output())
    end)

    it("leaves a request unacked when its server dies mid-request, so another gets it redelivered", function()
      local T = H.scope(finally)
      local queue, replies = H.queue("crash"), H.queue("replies")
      local child = T:spawn {code = CHILD_SERVER, queue = queue}
      child:wait_ready()
      H.amqp {
        {op = "declare", queue = replies},
        {op = "publish", routing_key = queue, body = "sleep 30 job",
         properties = {reply_to = replies, correlation_id = "cid-crash"}},
      }
      child:wait_file("started", 10)
      child:kill("KILL")
      assert.equal(128 + 9, child:wait(5))
      local request
      local server = T:server(queue, function(body, req)
        request = req
        return "second:" .. body
      end, {reply_to_allow = replies})
      H.wait_until(function() return server:poll(0.5) == 1 end, 10, "the redelivered request")
      assert.is_table(request)
      assert.is_true(request.redelivered)
      assert.equal("cid-crash", request.correlation_id)
      local reply = H.amqp1 {op = "get", queue = replies, timeout = 5}
      assert.equal("second:sleep 30 job", reply.body)
      assert.equal("cid-crash", reply.properties.correlation_id)
    end)
  end)

  describe("rpc.serve", function()
    it("serves until SIGTERM, then returns true", function()
      local T = H.scope(finally)
      local queue = H.queue("serve")
      local child = T:spawn {code = CHILD_SERVE, queue = queue}
      child:wait_ready()
      ping(T, queue)
      child:kill("TERM")
      local status = child:wait(2)
      assert.is_not_nil(status, "still running 2 s after SIGTERM; output:\n" .. child:output())
      assert.equal(0, status, child:output())
      assert.matches("serve:%s+true", child:output())
    end)
  end)

  describe("queue options", function()
    it("durable = true declares a durable queue", function()
      local T = H.scope(finally)
      local queue = H.queue("durable")
      T:server(queue, function(body) return body end, {durable = true})
      local results = H.amqp {
        {op = "declare", queue = queue, durable = false},
        {op = "declare", queue = queue, durable = true},
      }
      assert.equal(406, results[1].error)
      assert.is_true(results[2].ok)
    end)

    it("durable = false (the default) declares a transient queue", function()
      local T = H.scope(finally)
      local queue = H.queue("transient")
      T:server(queue, function(body) return body end)
      local results = H.amqp {
        {op = "declare", queue = queue, durable = true},
        {op = "declare", queue = queue, durable = false},
      }
      assert.equal(406, results[1].error)
      assert.is_true(results[2].ok)
    end)

    it("exclusive = true declares a queue only its connection can use, gone once closed", function()
      local T = H.scope(finally)
      local queue = H.queue("exclusive")
      local server = T:server(queue, function(body) return body end, {exclusive = true})
      assert.equal(405, H.amqp1({op = "count", queue = queue}).error)
      assert.equal("in", T:client(queue):call("in", 5))
      server:close()
      H.wait_until(function()
        return H.amqp1({op = "count", queue = queue}).error == 404
      end, 5, "the exclusive queue to go")
    end)

    it("auto_delete = true declares a queue deleted when its server closes", function()
      local T = H.scope(finally)
      local queue = H.queue("auto-delete")
      local server = T:server(queue, function(body) return body end, {auto_delete = true})
      assert.is_true(H.amqp1({op = "count", queue = queue}).ok)
      server:close()
      H.wait_until(function()
        return H.amqp1({op = "count", queue = queue}).error == 404
      end, 5, "the auto-delete queue to go")
    end)

    it("arguments are declared with the queue", function()
      local T = H.scope(finally)
      local queue = H.queue("arguments")
      local server = T:server(queue, function(body) return body end,
                              {arguments = {["x-max-length"] = 10}})
      local results = H.amqp {
        {op = "declare", queue = queue},  -- no x-max-length: inequivalent
        {op = "count", queue = queue},
      }
      assert.equal(406, results[1].error)
      assert.matches("x%-max%-length", results[1].text)
      assert.is_true(results[2].ok)
      assert.equal("still", T:client(queue):call("still", 5))
      assert.equal(1, server:stats().requests)
    end)

    it("arguments accept x-queue-type classic", function()
      local T = H.scope(finally)
      local queue = H.queue("classic")
      T:server(queue, function(body) return body end,
               {durable = true, arguments = {["x-queue-type"] = "classic"}})
      assert.equal("classic", T:client(queue):call("classic", 5))
    end)

    it("prefetch lets the broker send that many requests ahead", function()
      local T = H.scope(finally)
      local queue = H.queue("prefetch")
      local server = T:server(queue, function(body) return body end, {prefetch = 5})
      H.amqp {
        {op = "publish", routing_key = queue, body = "1"},
        {op = "publish", routing_key = queue, body = "2"},
        {op = "publish", routing_key = queue, body = "3"},
      }
      -- nobody reads the server's connection yet, but all three leave the queue for it
      H.wait_until(function()
        return H.amqp1({op = "count", queue = queue}).messages == 0
      end, 5, "the broker to send three requests ahead")
      local total = 0
      H.wait_until(function()
        total = total + server:poll(0.3)
        return total == 3
      end, 5, "three requests")
    end)

    it("returns nil, message, 'broker' when the queue exists with other flags", function()
      local T = H.scope(finally)
      local queue = H.queue("inequivalent")
      T:server(queue, function(body) return body end)
      local server, message, kind = rpc.server(queue, function(body) return body end,
                                               H.opts {durable = true})
      if server then server:close() end
      assert.is_nil(server)
      assert.equal("broker", kind)
      assert.is_string(message)
      assert.is_truthy(message:find("406") or message:find("PRECONDITION_FAILED") or message:find("inequivalent"),
        "the message names no reason: " .. message)
      H.assert_no_password(message)
    end)

    it("returns nil, message, 'broker' when the queue exists with other arguments", function()
      local queue = H.queue("inequivalent-args")
      assert.is_true(H.amqp1({op = "declare", queue = queue, arguments = {["x-max-length"] = 3}}).ok)
      local server, message, kind = rpc.server(queue, function(body) return body end,
                                               H.opts {arguments = {["x-max-length"] = 4}})
      if server then server:close() end
      assert.is_nil(server)
      assert.equal("broker", kind)
      assert.is_string(message)
    end)
  end)

  describe("server:stats", function()
    it("counts requests, replies, errors and no_reply_to as integers", function()
      local T = H.scope(finally)
      local queue = H.queue("server-stats")
      local server = T:server(queue, function(body)
        if body == "fail" then error("no") end
        return body
      end)
      local stats = server:stats()
      for _, name in ipairs {"requests", "replies", "errors", "no_reply_to"} do
        assert.equal(0, stats[name], name)
        assert.equal("integer", math.type(stats[name]), name)
      end
      local client = T:client(queue)
      client:call("a", 5)
      client:call("fail", 5)
      H.amqp1 {op = "publish", routing_key = queue, body = "quiet"}
      H.wait_until(function()
        server:poll(0.2)
        return server:stats().requests == 3
      end, 5, "three requests")
      stats = server:stats()
      assert.equal(3, stats.requests)
      assert.equal(2, stats.replies)
      assert.equal(1, stats.errors)
      assert.equal(1, stats.no_reply_to)
    end)
  end)
end)
