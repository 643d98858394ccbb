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

  describe("rpc.cqueues", function()
    it("makes calls from cqueues coroutines yield to the controller: four at once in about one handler time", function()
      local cqueues = require "cqueues"
      local rcq = require "rpc.cqueues"
      local T = H.scope(finally)
      local queue = H.queue("rcq")
      local server = T:server(queue, function(body) rpc.sleep(0.3) return "s:" .. body end, {prefetch = 10})
      local cq = cqueues.new()
      rcq.serve(cq, server)
      local replies, done, ticks, t0 = {}, 0, 0, H.now()
      for i = 1, 4 do
        cq:wrap(function()
          local client = assert(rpc.client(queue, H.opts()))
          replies[i] = {client:call("c" .. i, 5)}
          assert(rpc.sleep(0.05))  -- yields to cqueues too
          client:close()
          done = done + 1
          if done == 4 then server:close() end  -- ends rcq.serve's coroutine
        end)
      end
      cq:wrap(function()
        while done < 4 and H.now() - t0 < 10 do cqueues.sleep(0.02) ticks = ticks + 1 end
      end)
      local ok, err = cq:loop()
      assert.is_true(ok, tostring(err))
      local took = H.now() - t0
      for i = 1, 4 do assert.same({"s:c" .. i}, replies[i]) end
      assert.is_true(took < 2.5, ("took %.3f s"):format(took))
      assert.is_true(ticks >= 5, ("the other coroutine ticked %d times"):format(ticks))
    end)

    it("makes call_all and conn:receive in cqueues coroutines yield too", function()
      local cqueues = require "cqueues"
      local rcq = require "rpc.cqueues"
      local T = H.scope(finally)
      local queue, inbox = H.queue("rcq-all"), H.queue("rcq-inbox")
      local server = T:server(queue, function(body) rpc.sleep(0.3) return "s:" .. body end, {prefetch = 10})
      local conn = assert(rpc.connect(H.opts()))
      T:defer(function() conn:close() end)
      assert(conn:declare_queue(inbox, {auto_delete = true}))
      assert(conn:consume(inbox, {ack = false}))
      local publisher = T:client(queue)  -- only for its connection's publish below
      local cq = cqueues.new()
      rcq.serve(cq, server)
      local all, received, ticks, t0 = nil, nil, 0, H.now()
      cq:wrap(function()
        all = {publisher:call_all({"a", "b", "c"}, 5)}
      end)
      cq:wrap(function()
        local m, message, kind = conn:receive(5)
        received = m and m.body or kind .. ": " .. message
      end)
      cq:wrap(function()
        cqueues.sleep(0.1)
        local other = assert(rpc.connect(H.opts()))
        assert(other:publish("", inbox, "hello"))
        other:close()
      end)
      cq:wrap(function()
        while not (all and received) and H.now() - t0 < 10 do cqueues.sleep(0.02) ticks = ticks + 1 end
        server:close()
      end)
      local ok, err = cq:loop()
      assert.is_true(ok, tostring(err))
      assert.same({{"s:a", "s:b", "s:c"}}, all)
      assert.equal("hello", received)
      assert.is_true(ticks >= 5, ("the other coroutine ticked %d times"):format(ticks))
    end)

    it("survives a connection the broker closes while a cqueues coroutine waits on it", function()
      local cqueues = require "cqueues"
      require "rpc.cqueues"
      local T = H.scope(finally)
      local queue = H.queue("rcq-lost")
      local child = T:spawn {code = [[
        local server = assert(rpc.server(QUEUE, function(body) rpc.sleep(2) return "late:" .. body end, {url = URL, prefetch = 5}))
        ready()
        server:run()
      ]], queue = queue}
      child:wait_ready()
      local before = H.broker_ports()
      local client = T:client(queue)
      local port = H.new_ports(before, H.broker_ports())[1]
      local cq = cqueues.new()
      local first, second
      cq:wrap(function()
        first = {client:call("one", 10)}
        second = {client:call("two", 10)}
      end)
      cq:wrap(function()
        cqueues.sleep(0.3)
        local _, pids = H.broker_connections()
        H.ctl("close_connection", pids[port], "spec: closed under cqueues")
      end)
      local ok, err = cq:loop()
      assert.is_true(ok, tostring(err))
      assert.is_nil(first[1])
      assert.equal("connection", first[3], tostring(first[2]))
      assert.same({"late:two"}, second)  -- its first attempt, on a new connection
    end)
  end)
end)
