-- Lifetimes: close, <close>, __gc, tostring, one Lua state with many parts, nested calls,
-- no globals, memory over many calls.
local H = require "support.helpers"
local rpc = require "rpc"

local function echo(body) return body end

--- Waits until the broker no longer lists a connection from local port `port`.
local function wait_broker_forgets(port, timeout)
  H.wait_until(function()
    local ports = H.broker_connections()
    return not H.contains(ports, port)
  end, timeout or 20, "the broker to drop the connection from port " .. port)
end

describe("lifecycle", function()
  teardown(H.cleanup)

  describe("close", function()
    it("is harmless twice on a client and on a server", function()
      local T = H.scope(finally)
      local queue = H.queue("close")
      local server = T:server(queue, echo)
      local client = T:client(queue)
      assert.equal("x", client:call("x", 5))
      client:close()
      client:close()
      server:close()
      server:close()
      assert.matches("closed", tostring(client))
      assert.matches("closed", tostring(server))
      collectgarbage()
      collectgarbage()
    end)

    it("closes the client's connection to the broker", function()
      local T = H.scope(finally)
      local before = H.broker_ports()
      local client = T:client(H.queue("close-conn"))
      local mine = H.new_ports(before, H.broker_ports())
      assert.equal(1, #mine, "expected one new connection to the broker")
      client:close()
      assert.is_false(H.contains(H.broker_ports(), mine[1]), "the socket is still open")
    end)

    it("stops a server consuming its queue", function()
      local T = H.scope(finally)
      local queue = H.queue("close-consumer")
      local server = T:server(queue, echo)
      assert.equal(1, H.amqp1({op = "count", queue = queue}).consumers)
      server:close()
      H.wait_until(function()
        return H.amqp1({op = "count", queue = queue}).consumers == 0
      end, 5, "the consumer to go")
    end)
  end)

  describe("a <close> variable", function()
    it("closes a client at the end of its block", function()
      local T = H.scope(finally)
      local queue = H.queue("tbc")
      T:server(queue, echo)
      local before = H.broker_ports()
      local kept
      do
        local client <close> = assert(rpc.client(queue, H.opts()))
        kept = client
        assert.equal("inside", client:call("inside", 5))
        assert.equal(1, #H.new_ports(before, H.broker_ports()))
      end
      assert.matches("closed", tostring(kept))
      assert.same({}, H.new_ports(before, H.broker_ports()))
      local reply, _, kind = kept:call("after", 5)
      assert.is_nil(reply)
      assert.equal("closed", kind)
    end)

    it("closes a server at the end of its block, also when the block raises", function()
      local queue = H.queue("tbc-server")
      local kept
      local ok, err = pcall(function()
        local server <close> = assert(rpc.server(queue, echo, H.opts()))
        kept = server
        error("leaving the block")
      end)
      assert.is_false(ok)
      assert.matches("leaving the block", err)
      assert.matches("closed", tostring(kept))
      H.wait_until(function()
        return H.amqp1({op = "count", queue = queue}).consumers == 0
      end, 5, "the consumer to go")
    end)
  end)

  it("__gc closes an unreachable client's connection #slow", function()
    local queue = H.queue("gc")
    local before = H.broker_ports()
    local client = assert(rpc.client(queue, H.opts()))
    local mine = H.new_ports(before, H.broker_ports())
    assert.equal(1, #mine, "expected one new connection to the broker")
    local port = mine[1]
    H.wait_until(function() return H.contains((H.broker_connections()), port) end, 20,
                 "the broker to list the connection")
    local weak = setmetatable({client}, {__mode = "v"})
    client = nil   -- luacheck: ignore
    collectgarbage()
    collectgarbage()
    assert.is_nil(weak[1], "the client was not collected")
    H.wait_until(function() return not H.contains(H.broker_ports(), port) end, 5, "the socket to close")
    wait_broker_forgets(port)
  end)

  describe("tostring", function()
    it("names the type, the queue and host:port, never the password", function()
      local T = H.scope(finally)
      local queue = H.queue("tostring")
      local server = T:server(queue, echo)
      local client = T:client(queue)
      for prefix, object in pairs {["rpc.client ("] = client, ["rpc.server ("] = server} do
        local s = tostring(object)
        assert.equal(prefix, s:sub(1, #prefix))
        assert.matches(queue, s, 1, true)
        assert.matches(H.HOSTPORT, s, 1, true)
        H.assert_no_password(s)
        object:close()
        s = tostring(object)
        assert.equal(prefix, s:sub(1, #prefix))
        assert.matches("closed", s, 1, true)
        H.assert_no_password(s)
      end
    end)
  end)

  describe("one Lua state", function()
    it("serves a server while a client of the same state waits, without run()", function()
      local T = H.scope(finally)
      local queue = H.queue("same-state")
      local server = T:server(queue, function(body) return "served " .. body end)
      local client = T:client(queue)
      for i = 1, 3 do assert.equal("served " .. i, client:call(i, 5)) end
      assert.equal(3, server:stats().requests)
    end)

    it("serves every open server while one client waits", function()
      local T = H.scope(finally)
      local qa, qb = H.queue("a"), H.queue("b")
      T:server(qa, function(body) return "a:" .. body end)
      T:server(qb, function(body) return "b:" .. body end)
      local client = T:client(qa)
      assert.equal("a:1", client:call("1", 5))
      assert.equal("b:2", client:call("2", 5, {routing_key = qb}))
    end)

    it("lets a handler call another service through its own client (nested calls)", function()
      local T = H.scope(finally)
      local qa, qb = H.queue("outer"), H.queue("inner")
      T:server(qb, function(body) return "B(" .. body .. ")" end)
      local to_b = T:client(qb)
      T:server(qa, function(body)
        local reply, message, kind = to_b:call(body, 5)
        if not reply then error(kind .. ": " .. message) end
        return "A(" .. reply .. ")"
      end)
      local client = T:client(qa)
      assert.equal("A(B(x))", client:call("x", 10))
      assert.equal("A(B(y))", client:call("y", 10))
    end)

    it("lets a handler call another service through the very client that is waiting on it", function()
      local T = H.scope(finally)
      local qa, qb = H.queue("outer"), H.queue("inner")
      local client = T:client(qa)
      T:server(qb, function(body) return "B(" .. body .. ")" end)
      T:server(qa, function(body)
        local reply, message, kind = client:call(body, 5, {routing_key = qb})
        if not reply then error(kind .. ": " .. message) end
        return "A(" .. reply .. ")"
      end)
      assert.equal("A(B(x))", client:call("x", 10))
      assert.equal(2, client:stats().calls)
      assert.equal(2, client:stats().replies)
    end)

    it("nests three services deep", function()
      local T = H.scope(finally)
      local q1, q2, q3 = H.queue("one"), H.queue("two"), H.queue("three")
      T:server(q3, function(body) return "3" .. body end)
      local c3 = T:client(q3)
      T:server(q2, function(body) return "2" .. assert(c3:call(body, 5)) end)
      local c2 = T:client(q2)
      T:server(q1, function(body) return "1" .. assert(c2:call(body, 5)) end)
      assert.equal("123x", T:client(q1):call("x", 10))
    end)
  end)

  it("require 'rpc' adds no globals", function()
    local out, status, err = H.run_lua([[
      local before = {}
      for k in pairs(_G) do before[k] = true end
      local rpc = require "rpc"
      assert(type(rpc) == "table", "require 'rpc' returned a " .. type(rpc))
      for _, name in ipairs {"client", "server", "serve"} do
        assert(type(rpc[name]) == "function", "rpc." .. name .. " is not a function")
      end
      local added = {}
      for k in pairs(_G) do if not before[k] then added[#added + 1] = tostring(k) end end
      table.sort(added)
      print("added: [" .. table.concat(added, " ") .. "]")
    ]])
    assert.equal(0, status, err)
    assert.matches("added: %[%]", out)
  end)

  it("keeps RSS flat over 20,000 calls in one process #slow", function()
    local T = H.scope(finally)
    local queue = H.queue("rss")
    local server = T:server(queue, echo)
    local client = T:client(queue)
    local function calls(from, to)
      for i = from, to do
        local body = "call " .. i
        local reply, message, kind = client:call(body, 5)
        if reply ~= body then error(("call %d: %s %s %s"):format(i, tostring(reply), message, kind)) end
      end
    end
    -- the collector must run through the calls: stopped (by an earlier spec in this process,
    -- or a path of the module that stops it and never restarts it), the garbage of 20,000 calls
    -- stays until the full collection below, and RSS grows by ~1.8 kB a call
    assert.is_true(collectgarbage("isrunning"), "the collector is stopped before the calls")
    -- a warm-up as long as the measure: after an earlier spec's 16 MiB bodies, the allocator
    -- settles over the first thousands of calls (+5 MB once, then +0 kB per 20,000: measured)
    calls(1, 22000)
    collectgarbage()
    collectgarbage()
    local before = H.rss_kb()
    local stopped = 0
    for from = 22001, 42000, 1000 do
      calls(from, from + 999)
      if not collectgarbage("isrunning") then stopped = stopped + 1 end
    end
    assert.equal(0, stopped, "the collector was found stopped after that many of the 20 batches of calls")
    collectgarbage()
    collectgarbage()
    local growth = H.rss_kb() - before
    assert.is_true(growth < 2048, ("RSS grew by %d kB over 20,000 calls"):format(growth))
    assert.equal(42000, client:stats().replies)
    assert.equal(42000, server:stats().requests)
  end)
end)
