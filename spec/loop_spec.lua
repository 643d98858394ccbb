-- The wait loop shared by every client and server of a Lua state: fairness, stop, deleted
-- queues, and re-entrancy through finalizers.
local H = require "support.helpers"
local rpc = require "rpc"

describe("the wait loop", function()
  teardown(H.cleanup)

  it("keeps serving a stopped server for other waiters, and run() of another still returns", function()
    local T = H.scope(finally)
    local qa, qb = H.queue("stopped"), H.queue("runner")
    local a = T:server(qa, function(body) return "a:" .. body end)
    a:stop()  -- only makes a's run() return: a is still open and served
    local b
    b = T:server(qb, function(body)
      b:stop()
      return "b:" .. body
    end)
    local client = T:client(qa)
    local elapsed, reply = H.timed(client.call, client, "x", 5)
    assert.equal("a:x", reply)
    assert.is_true(elapsed < 0.5, ("took %.3f s"):format(elapsed))
    T:watchdog(10)
    local caller = T:spawn {code = ("local c = assert(rpc.client(%q, {url = URL})); print(c:call('go', 5))"):format(qb)}
    local t0 = H.now()
    assert.is_true(b:run())
    assert.is_true(H.now() - t0 < 5)
    assert.equal(0, caller:wait(5))
    assert.matches("b:go", caller:output())
  end)

  it("does not let one server's backlog hold a waiting call past its timeout", function()
    local T = H.scope(finally)
    local busy, quick = H.queue("backlog"), H.queue("quick")
    T:server(busy, function() H.sleep(0.005) return "done" end, {prefetch = 200})
    T:server(quick, function(body) return body end)
    local flood = T:client(busy)
    for _ = 1, 300 do flood:send("job", {timeout = 30}) end
    H.sleep(0.3)  -- let the backlog arrive in this process's socket
    local client = T:client(quick)
    local elapsed, reply = H.timed(client.call, client, "me first", 1)
    assert.equal("me first", reply)
    assert.is_true(elapsed < 1, ("took %.3f s behind the backlog"):format(elapsed))
  end)

  it("re-declares a queue deleted under a running server, says so through opts.log, serves on", function()
    local T = H.scope(finally)
    local queue = H.queue("deleted")
    local lines = {}
    local server = T:server(queue, function(body) return "again:" .. body end,
                            {log = function(line) lines[#lines + 1] = line end})
    assert.is_true(H.amqp1 {op = "delete", queue = queue}.ok)
    H.wait_until(function()
      server:poll(0.1)
      return server:stats().reconnects == 1
    end, 5, "the server to notice and come back")
    assert.matches("cancelled the consumer of queue '" .. queue .. "'", lines[1], 1, true)
    assert.matches("reconnecting in", lines[1], 1, true)
    assert.matches("reconnected to amqp://", lines[2], 1, true)
    local client = T:client(queue)
    assert.equal("again:x", client:call("x", 5))
  end)

  it("reconnects a server whose connection the broker closed, and serves on #slow", function()
    local T = H.scope(finally)
    local queue = H.queue("forced")
    local before = H.broker_ports()
    local server = T:server(queue, function(body) return "back:" .. body end)
    local mine = H.new_ports(before, H.broker_ports())
    assert.equal(1, #mine)
    local _, pids = H.broker_connections()
    assert.is_string(pids[mine[1]], "rabbitmqctl does not list the server's connection")
    local out, status = H.ctl("close_connection", pids[mine[1]], "spec: forced close")
    assert.equal(0, status, out)
    H.wait_until(function()
      server:poll(0.1)
      return server:stats().reconnects == 1 and server:stats().connected
    end, 10, "the server to reconnect")
    local client = T:client(queue)
    assert.equal("back:y", client:call("y", 5))
  end)

  it("ends a wait with 'closed' when a finalizer closes the client while replies are kept", function()
    local T = H.scope(finally)
    local queue = H.queue("finalizer")
    T:server(queue, function(body) return body end, {prefetch = 100})
    local client = T:client(queue)
    local ids = {}
    for i = 1, 100 do ids[i] = client:send(("x"):rep(20000)) end  -- 2 MB of replies to keep
    local waiting, closed_during_wait, where = false, false, nil
    local function on_gc()
      if where then return end
      closed_during_wait = waiting
      where = debug.traceback()
      client:close()
    end
    -- incremental, a new cycle at once, 10x the work per step, from a full collection: whole
    -- cycles within the wait's 2 MB of kept replies. (lua5.4 starts generational, whose minor
    -- collections stop after a "bad" major one: earlier specs may have left it so.) A pause of
    -- 1 %, not 0: 0 leaves the pause as it was (200 %), and with a live heap over the wait's
    -- allocations (what the specs before this one left) no cycle would start during the wait.
    -- Stopped while the garbage is made: at that pace a cycle would finalize it before the wait.
    local mode = collectgarbage("incremental", 1, 1000, 10)
    T:defer(function()  -- back to what it was, with Lua's default parameters
      if mode == "generational" then collectgarbage(mode, 20, 100) else collectgarbage(mode, 200, 100, 13) end
      collectgarbage("restart")
    end)
    collectgarbage()
    collectgarbage("stop")
    for _ = 1, 100 do setmetatable({}, {__gc = on_gc}) end  -- garbage: the first finalized closes
    waiting = true
    collectgarbage("restart")
    local reply, message, kind = client:wait(ids[100], 5)  -- keeps the 99 others' replies first
    waiting = false
    assert.is_true(closed_during_wait, ("the finalizer did not run during the wait: %s (GC running: %s, reply %s, %s)")
      :format(tostring(where), tostring(collectgarbage("isrunning")), tostring(reply), tostring(kind)))
    assert.is_nil(reply)
    assert.equal("closed", kind, message)
    assert.equal("closed", select(3, client:call("x")))
  end)

  it("refuses headers too large for one frame with a bad argument, keeping the connection", function()
    local T = H.scope(finally)
    local queue = H.queue("bighdr")
    T:server(queue, function(body) return body end)
    local client = T:client(queue)
    local err = H.error_of(function() client:call("x", 5, {headers = {x = ("h"):rep(140000)}}) end)
    assert.matches("bad argument #3 to 'call' %(table too large", err)
    assert.equal("still fine", client:call("still fine", 5))
  end)

  it("lets Ctrl-C (SIGINT) interrupt a waiting call at once, as Lua's own 'interrupted!'", function()
    local T = H.scope(finally)
    local queue = H.queue("interrupt")
    assert.is_true(H.amqp1 {op = "declare", queue = queue}.ok)  -- nobody consumes: it waits
    local child = T:spawn {code = [[
      local c = assert(rpc.client(QUEUE, {url = URL}))
      ready()
      print(c:call("x", 30))
    ]], queue = queue}
    child:wait_ready()
    H.sleep(0.2)
    local t0 = H.now()
    child:kill("INT")
    local status = child:wait(2)
    assert.is_not_nil(status, "still waiting 2 s after SIGINT")
    assert.is_true(H.now() - t0 < 1, ("exited %.3f s after SIGINT"):format(H.now() - t0))
    assert.not_equal(0, status)
    assert.matches("interrupted!", child:output())
  end)
end)
