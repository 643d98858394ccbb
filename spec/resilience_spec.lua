-- Faults from the broker's side: its app stopped and started, connections closed under calls.
-- Each spec restores what it broke (start_app in finally), and kills only its own children.
local H = require "support.helpers"

-- A child server that logs to stderr, so the spec can see it reconnect.
local LOGGING_SERVER = [[
local server = assert(rpc.server(QUEUE, function(body) return "ok:" .. body end, {url = URL,
  log = function(line) io.stderr:write(line, "\n") end}))
ready()
print("run:", server:run())
]]

describe("resilience", function()
  teardown(H.cleanup)

  it("a client and a server recover when the broker's app is stopped and started #slow", function()
    local T = H.scope(finally)
    local queue = H.queue("restart")
    local server = T:spawn {code = LOGGING_SERVER, queue = queue}
    server:wait_ready()
    local client = T:client(queue)
    assert.equal("ok:before", client:call("before", 5))

    T:defer(function() H.ctl("start_app") end)  -- whatever happens below
    local out, status = H.ctl("stop_app")
    assert.equal(0, status, out)
    local elapsed, reply, message, kind = H.timed(client.call, client, "during", 5)
    assert.is_nil(reply)
    assert.equal("connection", kind, message)
    assert.is_true(elapsed < 5.5, ("took %.3f s"):format(elapsed))
    H.assert_no_password(message)

    out, status = H.ctl("start_app")
    assert.equal(0, status, out)
    local after = H.wait_until(function()
      return client:call("after", 2)
    end, 30, "a call to succeed after start_app")
    assert.equal("ok:after", after)
    assert.matches("reconnected to amqp://", server:output())
    assert.is_nil(server:status(), "the server exited: " .. server:output())
  end)

  it("a client and a server given urls carry on through the second broker when the first stops #slow", function()
    local T = H.scope(finally)
    local port = H.PORT + 1
    local env = {RPC_BROKER_PORT = tostring(port), RPC_BROKER_DIR = H.tmpdir() .. "/second-broker"}
    local out, status = H.run(H.quote(H.BROKER) .. " start", env)
    assert.equal(0, status, out)
    T:defer(function() H.run(H.quote(H.BROKER) .. " stop", env) end)
    local urls = {H.URL, H.url_with {port = port}}
    local queue = H.queue("failover")
    local lines = {}
    local server = T:server(queue, function(body) return "served:" .. body end,
                            {urls = urls, log = function(line) lines[#lines + 1] = line end})
    local client = T:client(queue, {urls = urls})
    assert.equal("served:one", client:call("one", 5))
    assert.matches(":" .. H.PORT .. "/", tostring(client), 1, true)

    T:defer(function() H.ctl("start_app") end)
    out, status = H.ctl("stop_app")
    assert.equal(0, status, out)
    local reply = H.wait_until(function()
      return client:call("two", 1)
    end, 20, "a call through the second broker")
    assert.equal("served:two", reply)
    assert.matches(":" .. port .. "/", tostring(client), 1, true)
    assert.matches(":" .. port .. "/", tostring(server), 1, true)
    assert.matches("reconnected to amqp://guest@localhost:" .. port, table.concat(lines, "\n"), 1, true)
  end)

  it("says that every broker was tried when none of urls answers", function()
    local rpc = require "rpc"
    local client, message, kind = rpc.client("q", {urls = {H.url_with {port = 1}, H.url_with {port = 2}}})
    assert.is_nil(client)
    assert.equal("connection", kind)
    assert.matches("none of the 2 brokers answered", message, 1, true)
    H.assert_no_password(message)
  end)

  it("ends a call whose publish stalls on a peer that stopped reading, within its timeout #slow", function()
    local T = H.scope(finally)
    local proxy, port = T:proxy()
    local queue = H.queue("stalled")
    T:server(queue, function(body) return #body end)
    local client = T:client(queue, {url = H.url_with {port = port}})
    assert.equal("5", client:call("hello", 5))
    proxy:kill("STOP")
    T:defer(function() proxy:kill("CONT") end)
    local big = ("x"):rep(64 * 1024 * 1024)  -- far more than the socket buffers hold
    local elapsed, reply, message, kind = H.timed(client.call, client, big, 2)
    assert.is_nil(reply)
    assert.equal("connection", kind, message)
    assert.is_true(elapsed < 2 + 2, ("took %.3f s with a 2 s timeout"):format(elapsed))
    proxy:kill("CONT")
    H.assert_no_password(message)
  end)

  it("discards and counts the duplicate reply when a server dies after replying, before acking", function()
    local T = H.scope(finally)
    local queue = H.queue("dup")
    local first = T:spawn {python = H.ROOT .. "/spec/support/reply_then_die.py", args = {queue}}
    first:wait_output("ready")
    local client = T:client(queue)
    assert.equal("first:job", client:call("job", 5))
    assert.equal(0, first:wait(5), first:output())
    local seen = {}
    local server = T:server(queue, function(body, request)
      seen[#seen + 1] = body .. (request.redelivered and " (redelivered)" or "")
      return "second:" .. body
    end)
    assert.equal("second:next", client:call("next", 5))
    -- the redelivery comes back as a counted copy at the back of the queue (README "Poison
    -- requests"), so after "next" as a rule; its duplicate reply is discarded by a later wait
    H.wait_until(function()
      server:poll(0.1)
      return #seen == 2
    end, 5, "the redelivered job")
    assert.equal("second:last", client:call("last", 5))
    table.sort(seen)
    assert.same({"job (redelivered)", "last", "next"}, seen)
    assert.equal(1, client:stats().discarded)
    assert.equal(3, server:stats().replies)
  end)

  it("keeps serving when a client is killed with requests in flight", function()
    local T = H.scope(finally)
    local queue = H.queue("orphans")
    local server = T:server(queue, function(body) H.sleep(0.01) return body end, {prefetch = 10})
    local child = T:spawn {code = [[
      local c = assert(rpc.client(QUEUE, {url = URL}))
      for i = 1, 30 do c:send("orphan " .. i) end
      ready()
      sleep(60)
    ]], queue = queue}
    child:wait_ready()
    child:kill("KILL")
    assert.equal(128 + 9, child:wait(5))
    H.wait_until(function()
      server:poll(0.1)
      return server:stats().requests == 30
    end, 10, "the orphaned requests to be served")
    local client = T:client(queue)
    assert.equal("still here", client:call("still here", 5))
    assert.equal(0, server:stats().errors)
    assert.is_true(server:stats().connected)
  end)

  it("ends calls within their timeout while the link is a blackhole, and calls again once it is back #slow", function()
    local T = H.scope(finally)
    local proxy, port = T:proxy()
    local queue = H.queue("blackhole")
    T:server(queue, function(body) return "echo:" .. body end)
    local client = T:client(queue, {url = H.url_with {port = port}, heartbeat = 1})
    assert.equal("echo:a", client:call("a", 5))
    proxy:kill("STOP")  -- nothing passes either way, and nobody says so
    T:defer(function() proxy:kill("CONT") end)
    -- heartbeat 1: the silence is noticed after about two heartbeats, long before the timeout
    local elapsed0, reply0, message0, kind0 = H.timed(client.call, client, "silence", 20)
    assert.is_nil(reply0)
    assert.equal("connection", kind0, message0)
    assert.is_true(elapsed0 < 4, ("noticed after %.3f s with heartbeat 1"):format(elapsed0))
    for _ = 1, 3 do  -- each ends by its timeout or by the heartbeat, never later
      local elapsed, reply, _, kind = H.timed(client.call, client, "lost?", 1.5)
      assert.is_nil(reply)
      assert.is_truthy(kind == "timeout" or kind == "connection", kind)
      assert.is_true(elapsed < 1.5 + 1, ("took %.3f s with a 1.5 s timeout"):format(elapsed))
    end
    proxy:kill("CONT")
    local reply = H.wait_until(function() return client:call("b", 2) end, 15, "a call once the link is back")
    assert.equal("echo:b", reply)
  end)

  it("fails calls at once with 'blocked' while a resource alarm blocks publishing #slow", function()
    local T = H.scope(finally)
    local queue = H.queue("alarm")
    T:server(queue, function(body) return "ok:" .. body end)
    local client = T:client(queue)
    assert.equal("ok:before", client:call("before", 5))
    T:defer(function() H.ctl("set_vm_memory_high_watermark", "0.4") end)
    local out, status = H.ctl("set_vm_memory_high_watermark", "0.00001")  -- a memory alarm
    assert.equal(0, status, out)
    local message = H.wait_until(function()
      local reply, msg, kind = client:call("during", 1)
      assert.is_nil(reply, "a call went through during the alarm")
      return kind == "blocked" and msg
    end, 15, "the broker to block publishing")
    assert.matches("blocks publishing", message, 1, true)
    local elapsed, _, _, kind = H.timed(client.call, client, "again", 5)
    assert.equal("blocked", kind)
    assert.is_true(elapsed < 0.5, ("took %.3f s with a 5 s timeout"):format(elapsed))
    out, status = H.ctl("set_vm_memory_high_watermark", "0.4")
    assert.equal(0, status, out)
    assert.equal("ok:after", H.wait_until(function() return client:call("after", 1) end, 15,
                                          "publishing to be unblocked"))
  end)

  it("with confirm = true, fails a call at once when the broker refuses its request (basic.nack)", function()
    local T = H.scope(finally)
    local queue = H.queue("full")
    local declared = H.amqp1 {op = "declare", queue = queue,
                              arguments = {["x-max-length"] = 1, ["x-overflow"] = "reject-publish"}}
    assert.is_true(declared.ok, H.read_file and tostring(declared.text))
    local confirming = T:client(queue, {confirm = true})
    confirming:send("fills the queue")
    local elapsed, reply, message, kind = H.timed(confirming.call, confirming, "one too many", 5)
    assert.is_nil(reply)
    assert.equal("broker", kind)
    assert.matches("basic.nack", message, 1, true)
    assert.is_true(elapsed < 1, ("took %.3f s with a 5 s timeout"):format(elapsed))
    local plain = T:client(queue)  -- without confirms the same request just times out
    assert.equal("timeout", select(3, plain:call("one too many", 0.5)))
    assert.matches("bad argument #2 to 'client' %(option 'confirm' must be a boolean",
      H.error_of(function() T:client(queue, {confirm = 1}) end))
  end)

  it("ends every call within its timeout when the link is reset mid-call, many times #slow", function()
    local T = H.scope(finally)
    local proxy, port = T:proxy()
    local queue = H.queue("resets")
    T:spawn {code = [[
      local server = assert(rpc.server(QUEUE, function(body) sleep(0.3) return "slow:" .. body end,
                                       {url = URL}))
      ready()
      server:run()
    ]], queue = queue}:wait_ready()
    local client = T:client(queue, {url = H.url_with {port = port}})
    for round = 1, 8 do
      T:spawn {sh = "sleep 0.1; kill -USR1 " .. proxy.pid}  -- mid-call: the handler takes 0.3 s
      local elapsed, reply, message, kind = H.timed(client.call, client, "cut " .. round, 3)
      assert.is_nil(reply, "round " .. round .. " got a reply through a cut link")
      assert.equal("connection", kind, message)
      assert.is_true(elapsed < 1, ("round %d took %.3f s"):format(round, elapsed))
      assert.equal("slow:whole " .. round, client:call("whole " .. round, 3))
    end
  end)

  it("ends every call in flight when the broker's app stops under load, and recovers #slow", function()
    local T = H.scope(finally)
    local queue = H.queue("restart-load")
    local server = T:spawn {code = [[
      local server = assert(rpc.server(QUEUE, function(body) sleep(0.05) return "ok:" .. body end,
        {url = URL, prefetch = 10, log = function(line) io.stderr:write(line, "\n") end}))
      ready()
      server:run()
    ]], queue = queue}
    server:wait_ready()
    local client = T:client(queue)
    local ids = {}
    for i = 1, 100 do ids[i] = client:send("load " .. i, {timeout = 10}) end  -- 5 s of work
    T:defer(function() H.ctl("start_app") end)
    local out, status = H.ctl("stop_app")
    assert.equal(0, status, out)
    local replied, failed = 0, 0
    local t0 = H.now()
    for i = 1, 100 do
      local reply, message, kind = client:wait(ids[i])
      if reply then
        assert.equal("ok:load " .. i, reply)
        replied = replied + 1
      else
        assert.is_truthy(kind == "connection" or kind == "timeout", kind .. ": " .. tostring(message))
        failed = failed + 1
      end
    end
    assert.is_true(H.now() - t0 < 10 + 1, "the waits took longer than their timeout")
    assert.equal(100, replied + failed)
    assert.is_true(failed > 0, "the restart came too late to catch any call in flight")
    out, status = H.ctl("start_app")
    assert.equal(0, status, out)
    assert.equal("ok:after", H.wait_until(function() return client:call("after", 2) end, 30,
                                          "a call to succeed after start_app"))
  end)
end)
