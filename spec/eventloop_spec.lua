-- Outside event loops: rabbitrpc's objects speak cqueues' pollable protocol (pollfd, events,
-- timeout) and have a non-blocking step, so a cqueues controller or libuv can serve them.
local H = require "support.helpers"
local rpc = require "rpc"

describe("an outside event loop", function()
  teardown(H.cleanup)

  it("sees a server, a client and a connection as pollables: an fd, 'r', the state's timeout", function()
    local T = H.scope(finally)
    local queue = H.queue("pollable")
    local server = T:server(queue, function(body) return body end)
    local client = T:client(queue)
    local conn = assert(rpc.connect(H.opts()))
    T:defer(function() conn:close() end)
    for _, obj in ipairs {server, client, conn} do
      assert.is_true(math.type(obj:pollfd()) == "integer" and obj:pollfd() >= 0, tostring(obj))
      assert.equal("r", obj:events())
      local t = obj:timeout()
      assert.is_true(type(t) == "number" and t >= 0 and t <= 1, tostring(t))  -- a heartbeat read at least
      assert.is_true(obj:step())
    end
    local id = assert(client:send("stepped"))
    H.wait_until(function() server:step() client:step() return server:stats().replies == 1 end, 5, "a reply")
    assert.equal("stepped", client:wait(id, 1))
    conn:close()
    for _, method in ipairs {"pollfd", "events", "timeout", "step"} do
      assert.equal("closed", select(3, conn[method](conn)), method)
    end
  end)

  it("a cqueues controller serves a server, its handlers concurrently, while its other coroutines run", function()
    local cqueues = require "cqueues"
    local T = H.scope(finally)
    local queue = H.queue("cqueues")
    local server = T:server(queue, function(body) rpc.sleep(0.3) return "cq:" .. body end, {prefetch = 10})
    local caller = T:spawn {code = [[
      local c = assert(rpc.client(QUEUE, {url = URL}))
      local ids = {}
      for i = 1, 5 do ids[i] = assert(c:send("x" .. i, {timeout = 10})) end
      for i = 1, 5 do print(c:wait(ids[i])) end
    ]], queue = queue}
    local cq = cqueues.new()
    local ticks, running, t0 = 0, true, H.now()
    cq:wrap(function()
      while running do
        cqueues.poll(server)
        server:step()
        if server:stats().replies == 5 then running = false end
      end
    end)
    cq:wrap(function() while running do cqueues.sleep(0.02) ticks = ticks + 1 end end)
    cq:wrap(function()  -- a bound, should it hang
      while running and H.now() - t0 < 10 do cqueues.sleep(0.05) end
      running = false
    end)
    assert(cq:loop())
    local took = H.now() - t0
    assert.equal(5, server:stats().replies)
    assert.equal(0, caller:wait(5), caller:output())
    for i = 1, 5 do assert.matches("cq:x" .. i, caller:output(), 1, true) end
    assert.is_true(took < 2, ("five 0.3 s requests took %.3f s"):format(took))
    assert.is_true(ticks >= 5, ("the other coroutine ticked %d times"):format(ticks))
  end)

  it("examples/luv_server.lua serves through libuv, several requests at once", function()
    local T = H.scope(finally)
    local queue = H.queue("luv")
    local child = T:spawn {script = "examples/luv_server.lua", queue = queue}
    child:wait_output("Awaiting RPC requests", 10)
    local client = T:client(queue)
    local t0, ids = H.now(), {}
    for i = 1, 10 do ids[i] = assert(client:send("m" .. i, {timeout = 10})) end
    for i = 1, 10 do assert.equal("m" .. i, client:wait(ids[i])) end
    local took = H.now() - t0
    assert.is_true(took < 0.8, ("ten 0.1 s requests took %.3f s"):format(took))
    child:kill("TERM")
    assert.equal(0, child:wait(5), child:output())
    assert.matches("Stopped after %d+ ticks", child:output())
  end)
end)
