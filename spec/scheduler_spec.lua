-- The scheduler: every request a server takes runs its handler in a thread of its own, and a
-- wait inside it (client:call, client:wait, rpc.sleep) suspends only that thread; waits on the
-- main thread run the scheduler. Figures are asserted loosely (2 vCPUs, a shared broker): what
-- matters is concurrent against one-at-a-time, an order of magnitude apart.
local H = require "support.helpers"
local rpc = require "rpc"

local function elapsed_since(t0)
  return H.now() - t0
end

describe("the scheduler", function()
  teardown(H.cleanup)

  it("serves a front service whose handlers call a backend concurrently: 16 callers in about one backend time", function()
    local T = H.scope(finally)
    local front_q, back_q = H.queue("front"), H.queue("back")
    T:spawn {code = [[
      local server = assert(rpc.server(QUEUE, function(body) rpc.sleep(0.2) return "back:" .. body end,
                                       {url = URL, prefetch = 20}))
      ready()
      server:run()
    ]], queue = back_q}:wait_ready()
    T:spawn {code = ([[
      local backend = assert(rpc.client(%q, {url = URL}))   -- one client shared by every handler
      local server = assert(rpc.server(QUEUE, function(body)
        local reply, message, kind = backend:call(body, 10)
        return reply or error(kind .. ": " .. message)
      end, {url = URL, prefetch = 20}))
      ready()
      server:run()
    ]]):format(back_q), queue = front_q}:wait_ready()
    local client = T:client(front_q)
    assert.equal("back:warm", client:call("warm", 5))
    local t0, ids = H.now(), {}
    for i = 1, 16 do ids[i] = assert(client:send("c" .. i, {timeout = 10})) end
    for i = 1, 16 do assert.equal("back:c" .. i, client:wait(ids[i])) end
    local took = elapsed_since(t0)
    -- one at a time: 16 x 0.2 = 3.2 s; concurrently: 0.2 s and the round trips
    assert.is_true(took < 1.2, ("16 nested calls took %.3f s"):format(took))
  end)

  it("ends a main-thread call at its own deadline while the state's handlers wait on nested calls", function()
    local T = H.scope(finally)
    local queue, nobody = H.queue("busy"), H.queue("nobody")
    local server = T:server(queue, function() rpc.sleep(2) return "late" end, {prefetch = 10})
    local client = T:client(queue)
    H.amqp1 {op = "declare", queue = nobody}
    for i = 1, 5 do assert(client:send("slow " .. i, {timeout = 5})) end
    local other = T:client(nobody)
    local t0 = H.now()
    local reply, message, kind = other:call("x", 0.5)
    local took = elapsed_since(t0)
    assert.is_nil(reply)
    assert.equal("timeout", kind, message)
    assert.is_true(took < 0.5 + 0.25, ("a 0.5 s call took %.3f s"):format(took))
    assert.is_true(server:stats().in_progress >= 1, "no handler was under way meanwhile")
  end)

  it("replies as handlers finish, in any order, each acked after its reply", function()
    local T = H.scope(finally)
    local queue = H.queue("order")
    local server = T:server(queue, function(body) rpc.sleep(tonumber(body)) return body end, {prefetch = 10})
    local client = T:client(queue)
    local slow = assert(client:send("0.6"))
    local fast = assert(client:send("0.1"))
    local t0 = H.now()
    assert.equal("0.1", client:wait(fast))
    local first = elapsed_since(t0)
    assert.is_true(first < 0.45, ("the fast reply came after %.3f s, behind the slow one"):format(first))
    assert.equal("0.6", client:wait(slow))
    H.wait_until(function() return server:stats().in_progress == 0 end, 2, "both handlers to end")
    assert.equal(2, server:stats().replies)
    server:close()
    -- acked: nothing is left in the queue for the next consumer
    assert.equal(0, H.amqp1 {op = "declare", queue = queue, passive = true}.messages)
  end)

  it("call_all inside a handler suspends only that handler", function()
    local T = H.scope(finally)
    local queue, back = H.queue("fanout"), H.queue("fanback")
    T:server(back, function(body) rpc.sleep(0.3) return "b" .. body end, {prefetch = 20})
    local backend = T:client(back)
    T:server(queue, function(body)
      local replies = assert(backend:call_all({body .. 1, body .. 2, body .. 3}, 5))
      return table.concat(replies, ",")
    end, {prefetch = 5})
    local client = T:client(queue)
    local t0 = H.now()
    local ids = {}
    for i = 1, 4 do ids[i] = assert(client:send("x" .. i)) end
    for i = 1, 4 do
      assert.equal(("bx%d1,bx%d2,bx%d3"):format(i, i, i), client:wait(ids[i]))
    end
    local took = elapsed_since(t0)
    -- 4 handlers x 3 backend requests, all at once: about one backend time, not 4 x 0.3 s
    assert.is_true(took < 0.9, ("took %.3f s"):format(took))
  end)

  it("SIGTERM to a serving process lets the requests under way finish, reply and ack, and takes no new one", function()
    local T = H.scope(finally)
    local queue = H.queue("drain")
    local child = T:spawn {code = [[
      local started = 0
      local server = assert(rpc.server(QUEUE, function(body)
        started = started + 1
        touch("started" .. started)
        rpc.sleep(1)
        return "drained:" .. body
      end, {url = URL, prefetch = 10}))
      ready()
      print("run:", server:run())
      print("stats:", server:stats().requests, server:stats().replies, server:stats().in_progress)
    ]], queue = queue}
    child:wait_ready()
    local client = T:client(queue)
    local ids = {}
    for i = 1, 3 do ids[i] = assert(client:send("r" .. i, {timeout = 10})) end
    child:wait_file("started3", 5)
    child:kill("TERM")
    local t0 = H.now()
    for i = 1, 3 do assert.equal("drained:r" .. i, client:wait(ids[i])) end
    assert.equal(0, child:wait(5), child:output())
    assert.is_true(elapsed_since(t0) < 2.5, ("the drain took %.3f s"):format(elapsed_since(t0)))
    assert.matches("run:%s+true", child:output())
    assert.matches("stats:%s+3%s+3%s+0", child:output())
    -- a request sent once it stopped taking new ones waits in the queue, unacked by nobody
    assert(client:send("after", {timeout = 10}))
    H.wait_until(function()
      return H.amqp1 {op = "declare", queue = queue, passive = true}.messages == 1
    end, 5, "the request sent after the drain to wait in the queue")
  end)

  it("client:wait inside a handler suspends only that handler", function()
    local T = H.scope(finally)
    local queue, back = H.queue("waiter"), H.queue("waitback")
    T:server(back, function(body) rpc.sleep(0.3) return "b" .. body end, {prefetch = 10})
    local backend = T:client(back)
    T:server(queue, function(body)
      local id = assert(backend:send(body, {timeout = 5}))
      return (assert(backend:wait(id)))
    end, {prefetch = 5})
    local client = T:client(queue)
    local t0, ids = H.now(), {}
    for i = 1, 4 do ids[i] = assert(client:send("w" .. i)) end
    for i = 1, 4 do assert.equal("bw" .. i, client:wait(ids[i])) end
    local took = elapsed_since(t0)
    assert.is_true(took < 0.9, ("four waits took %.3f s (one at a time: 1.2 s)"):format(took))
  end)

  it("conn:receive inside a handler suspends only that handler", function()
    local T = H.scope(finally)
    local queue, inbox = H.queue("recv"), H.queue("inbox")
    local conn = assert(rpc.connect(H.opts()))
    T:defer(function() conn:close() end)
    assert(conn:declare_queue(inbox, {auto_delete = true}))
    assert(conn:consume(inbox, {ack = false}))
    T:server(queue, function(body)
      if body == "ping" then return "pong" end
      local m, message, kind = conn:receive(5)
      return m and ("got " .. m.body) or (kind .. ": " .. message)
    end, {prefetch = 5})
    local client = T:client(queue)
    local waiting = assert(client:send("receive"))
    local t0 = H.now()
    assert.equal("pong", client:call("ping", 5))  -- answered while the other handler waits
    assert.is_true(elapsed_since(t0) < 1, "ping waited for the receiving handler")
    local publisher = assert(rpc.connect(H.opts()))
    T:defer(function() publisher:close() end)
    assert(publisher:publish("", inbox, "hello"))
    assert.equal("got hello", client:wait(waiting))
  end)

  it("a client being collected does not make the loop spin while the state idles", function()
    local T = H.scope(finally)
    T:defer(function() collectgarbage("incremental", 200, 100, 13) collectgarbage("restart") end)
    local c = assert(rpc.client(H.queue("dropped"), H.opts()))  -- nothing else refers to it
    local weak = setmetatable({c}, {__mode = "v"})
    c = nil
    local garbage = {} for i = 1, 100000 do garbage[i] = {i} end
    garbage = nil
    collectgarbage("incremental", 200, 1, 0)
    collectgarbage("stop")
    local deadline = H.now() + 10
    while weak[1] ~= nil and H.now() < deadline do collectgarbage("step", 0) end  -- cleared, not finalized yet
    assert.is_nil(weak[1], "the client was not collected")
    collectgarbage("restart")
    local cpu = os.clock()
    rpc.sleep(1.5)
    local used = os.clock() - cpu
    assert.is_true(used < 0.5, ("rpc.sleep(1.5) used %.2f s of CPU"):format(used))
  end)

  it("a handler that yields in a loop does not starve the others' input", function()
    local T = H.scope(finally)
    local spin, echo = H.queue("spinner"), H.queue("echo")
    T:server(spin, function()
      local t0 = H.now()
      while H.now() - t0 < 2 do coroutine.yield() end
      return "spun"
    end)
    T:server(echo, function(body) return body end)
    local spinner, client = T:client(spin), T:client(echo)
    local id = assert(spinner:send("go"))
    rpc.sleep(0.05)
    local t0 = H.now()
    assert.equal("x", client:call("x", 5))
    assert.is_true(elapsed_since(t0) < 0.3, ("a call took %.3f s beside the yielding handler"):format(elapsed_since(t0)))
    assert.equal("spun", spinner:wait(id, 5))
  end)

  it("closing a client wakes the handlers waiting on it: they get 'closed' at once", function()
    local T = H.scope(finally)
    local queue, nobody = H.queue("closer"), H.queue("closed-nobody")
    H.amqp1 {op = "declare", queue = nobody}
    local inner = assert(rpc.client(nobody, H.opts()))
    T:defer(function() inner:close() end)
    T:server(queue, function()
      local reply, message, kind = inner:call("x", 10)
      return tostring(reply) .. "|" .. kind
    end)
    local client = T:client(queue)
    local id = assert(client:send("go"))
    rpc.sleep(0.1)
    inner:close()
    local t0 = H.now()
    assert.equal("nil|closed", client:wait(id, 5))
    assert.is_true(elapsed_since(t0) < 0.5, ("the waiter woke after %.3f s"):format(elapsed_since(t0)))
  end)

  it("a handler thread a script closes still gets its request answered and acked", function()
    local T = H.scope(finally)
    local queue = H.queue("closedthread")
    local thread
    local server = T:server(queue, function(body)
      if body == "first" then thread = coroutine.running() rpc.sleep(5) end
      return "ok:" .. body
    end)  -- prefetch 1: a request never acked would hold the server
    local client = T:client(queue)
    local id = assert(client:send("first"))
    H.wait_until(function() rpc.sleep(0.05) return thread ~= nil end, 5, "the handler to start")
    coroutine.close(thread)
    local reply, message, kind = client:wait(id, 7)
    assert.is_nil(reply)
    assert.equal("remote", kind, message)
    assert.equal("ok:second", client:call("second", 7))
    assert.equal(0, server:stats().in_progress)
  end)

  it("keeps idle clients and connections alive (heartbeats) while anything else in the state waits #slow", function()
    local T = H.scope(finally)
    local queue = H.queue("idle-hb")
    T:server(queue, function(body) return body end)
    local before = H.broker_ports()
    local idle = T:client(queue, {heartbeat = 1})
    local conn = assert(rpc.connect(H.opts {heartbeat = 1}))
    T:defer(function() conn:close() end)
    local mine = H.new_ports(before, H.broker_ports())
    assert.equal(2, #mine)
    rpc.sleep(4)  -- without heartbeats the broker closes a heartbeat-1 connection in 2 to 3 s
    local now = H.broker_ports()
    for _, port in ipairs(mine) do assert.is_true(H.contains(now, port), "connection on port " .. port .. " dropped") end
    assert.equal("still here", idle:call("still here", 5))
    assert.is_true(conn:declare_queue("", {exclusive = true}) ~= nil)
    assert.same(now, H.broker_ports())  -- the same connections: nothing was replaced
  end)

  it("rpc.sleep on the main thread serves the state's servers meanwhile", function()
    local T = H.scope(finally)
    local queue = H.queue("sleeper")
    local served = 0
    T:server(queue, function(body) served = served + 1 return body end)
    local client = T:client(queue)
    local id = assert(client:send("while sleeping"))
    local t0 = H.now()
    rpc.sleep(0.3)
    local took = elapsed_since(t0)
    assert.equal(1, served)
    assert.is_true(took >= 0.3 and took < 0.6, ("rpc.sleep(0.3) took %.3f s"):format(took))
    assert.equal("while sleeping", client:wait(id))
  end)

  it("a handler's bare coroutine.yield() gives the others a turn and carries on", function()
    local T = H.scope(finally)
    local queue = H.queue("yield")
    local trace = {}
    T:server(queue, function(body)
      trace[#trace + 1] = body .. " in"
      coroutine.yield()
      trace[#trace + 1] = body .. " out"
      return body
    end, {prefetch = 2})
    local client = T:client(queue)
    local a, b = assert(client:send("a")), assert(client:send("b"))
    assert.equal("a", client:wait(a))
    assert.equal("b", client:wait(b))
    -- both started before either went on: the yield let the other one in
    table.sort(trace, function(x, y) return (x:match("in$") and 0 or 1) < (y:match("in$") and 0 or 1) end)
    assert.same({"in", "in", "out", "out"}, {trace[1]:match("%a+$"), trace[2]:match("%a+$"),
                                             trace[3]:match("%a+$"), trace[4]:match("%a+$")})
  end)

  it("answers every request whose connection was lost while its handler waited, and acks no old tag #slow", function()
    local T = H.scope(finally)
    local queue = H.queue("lost")
    local lines = {}
    local before = H.broker_ports()
    -- long enough to outlast rabbitmqctl (about a second) and the reconnect
    local server = T:server(queue, function(body) rpc.sleep(3) return "done:" .. body end,
                            {prefetch = 10, log = function(line) lines[#lines + 1] = line end})
    local server_ports = H.new_ports(before, H.broker_ports())
    assert.equal(1, #server_ports)
    local client = T:client(queue)
    local ids = {}
    for i = 1, 3 do ids[i] = assert(client:send("r" .. i, {timeout = 20})) end
    H.wait_until(function() rpc.sleep(0.05) return server:stats().in_progress == 3 end, 5, "three handlers")
    local _, pids = H.broker_connections()
    assert(pids[server_ports[1]], "the server's connection is not listed")
    H.ctl("close_connection", pids[server_ports[1]], "spec: lost while handlers wait")
    -- the handlers end after the loss: their replies go out on the new connection
    for i = 1, 3 do assert.equal("done:r" .. i, client:wait(ids[i])) end
    -- the broker redelivers the three (never acked: their tags died with the old channel); a
    -- stale tag acked on the new channel would have made the broker close it (406)
    H.wait_until(function()
      rpc.sleep(0.05)
      return server:stats().replies == 6 and client:stats().discarded == 3
    end, 15, "the redelivered requests to be served again and their duplicates discarded")
    
    assert.equal(1, server:stats().reconnects, table.concat(lines, "\n"))
    assert.equal(6, server:stats().requests)
  end)

  it("a handler thread is not resumed before the loop has recorded its first suspension, even by a hook that turns the loop right then", function()
    local T = H.scope(finally)
    local queue = H.queue("adopt-window")
    local armed = false
    local server = T:server(queue, function(body)
      if body == "one" then
        armed = true          -- the next call on the main thread records this thread's suspension
        rpc.sleep(0.0005)
      else
        rpc.sleep(0.2)
      end
      return "done:" .. body
    end, {prefetch = 2})
    local client = T:client(queue, {timeout = 5})
    local one, two = client:send("one"), client:send("two")
    -- a call hook turning the loop there, as a finalizer run by a collection step may
    T:defer(function() debug.sethook() end)
    debug.sethook(function()
      if armed then armed = false; rpc.sleep(0.01) end
    end, "c")
    server:poll(1)
    debug.sethook()
    assert.equal("done:one", client:wait(one, 2))
    assert.equal("done:two", client:wait(two, 2))
    server:poll(0.3)
    local stats = server:stats()
    assert.equal(2, stats.replies)
    assert.equal(0, stats.errors, tostring(stats.last_error))
    assert.equal(0, stats.in_progress)
  end)

  it("a handler thread a script resumes is still its server's: server:poll() from it is refused", function()
    local T = H.scope(finally)
    local queue = H.queue("script-resume")
    local kept, refused, remaining
    local server
    server = T:server(queue, function()
      kept = coroutine.running()
      coroutine.yield()   -- a bare yield: whoever resumes it first, it runs on
      local ok, err = pcall(server.poll, server, 0)
      refused, remaining = not ok and tostring(err), rpc.remaining()
      return "done"
    end, {prefetch = 5})
    local client = T:client(queue, {timeout = 5})
    local id = client:send("x")
    assert.equal(1, server:poll(5))   -- the request started, its thread yielded: poll returns
    assert.is_thread(kept)
    assert.is_nil(refused, "the loop resumed the thread before the script could")
    assert.is_true(coroutine.resume(kept))   -- by the script, not the loop
    assert.is_string(refused, "server:poll() from its own handler's thread was allowed")
    assert.matches("called from its own handler", refused, 1, true)
    assert.equal("done", client:wait(id, 2))
    assert.equal(0, server:stats().in_progress)
  end)
end)
