-- Safe retries (opts.retries, callopts.retries): client:call sends a request again only when it
-- provably reached no handler (no_route, a basic.nack, blocked, a connection lost before the
-- publish), within the call's one deadline, with a backoff, each attempt numbered in
-- x-rpc-attempt; timeouts and handler errors are never retried. Every call promised to succeed
-- is asserted on its first call().
local H = require "support.helpers"
local rpc = require "rpc"

-- A child server on QUEUE, created once the child has slept DELAY seconds after touching
-- "started": its queue does not exist before. It replies body .. ":" .. the request's
-- x-rpc-attempt. ARGS: queue arguments (Lua source), if any.
local function late_server(delay, args)
  return ([[
touch("started")
sleep(%s)
local server = assert(rpc.server(QUEUE, function(body, request)
  return body .. ":" .. tostring((request.headers or {})["x-rpc-attempt"])
end, {url = URL, arguments = %s}))
ready()
server:run()
]]):format(delay, args or "nil")
end

--- The attempt number a late_server put in its reply to body.
local function attempt_of(reply, body)
  assert.is_string(reply)
  return tonumber(reply:match("^" .. body .. ":(%d+)$")) or error("not a late_server reply: " .. reply)
end

local FULL_ARGS = '{["x-max-length"] = 1, ["x-overflow"] = "reject-publish"}'

describe("safe retries", function()
  teardown(H.cleanup)

  it("sends a call again while nothing is bound: its first call() succeeds once a server declares the queue", function()
    local T = H.scope(finally)
    local queue = H.queue("late")
    local child = T:spawn {code = late_server(0.3), queue = queue}
    child:wait_file("started")
    local client = T:client(queue, {retries = 5})
    local took, reply, message, kind = H.timed(client.call, client, "hello", 2)
    assert.is_string(reply, ("%s: %s"):format(kind, message))
    local attempt = attempt_of(reply, "hello")
    assert.is_true(attempt > 1, "the handler got attempt " .. attempt)
    local stats = client:stats()
    assert.is_true(stats.retries >= 1)
    assert.equal(attempt - 1, stats.retries)
    assert.equal(1, stats.calls)
    assert.equal(1, stats.replies)
    assert.equal(stats.retries, stats.no_route)  -- every attempt before the last came back
    assert.is_true(took < 2, ("took %.3f s"):format(took))
  end)

  it("never retries a handler's error: the handler runs once and the caller gets 'remote'", function()
    local T = H.scope(finally)
    local queue = H.queue("remote")
    local runs = 0
    T:server(queue, function()
      runs = runs + 1
      error("refused", 0)
    end, {prefetch = 5})
    local client = T:client(queue, {retries = 5})
    local reply, message, kind = client:call("x", 2)
    assert.is_nil(reply)
    assert.equal("remote", kind)
    assert.matches("refused", message)
    assert(rpc.sleep(0.2))  -- serves: a request sent again would run the handler now
    assert.equal(1, runs)
    assert.equal(0, client:stats().retries)
    assert.equal(1, client:stats().calls)
  end)

  it("never retries a timeout: a handler that outlasts the call runs once", function()
    local T = H.scope(finally)
    local queue = H.queue("slow")
    local runs = 0
    T:server(queue, function()
      runs = runs + 1
      rpc.sleep(0.6)
      return "late"
    end, {prefetch = 5})
    local client = T:client(queue, {retries = 5})
    local took, reply, message, kind = H.timed(client.call, client, "x", 0.3)
    assert.is_nil(reply)
    assert.equal("timeout", kind, message)
    assert.is_true(took < 0.3 + 0.25, ("a 0.3 s call took %.3f s"):format(took))
    assert(rpc.sleep(0.8))  -- the handler ends; a second request would have started meanwhile
    assert.equal(1, runs)
    assert.equal(0, client:stats().retries)
    assert.equal(1, client:stats().discarded)  -- the late reply
  end)

  it("without retries (absent, 0, or callopts.retries = 0 over opts.retries) fails with 'no_route' after one attempt", function()
    local T = H.scope(finally)
    for _, case in ipairs {{}, {opts = {retries = 0}}, {opts = {retries = 5}, callopts = {retries = 0}}} do
      local client = T:client(H.queue("undeclared"), case.opts)
      local took, reply, message, kind = H.timed(client.call, client, "hello?", 5, case.callopts)
      assert.is_nil(reply)
      assert.equal("no_route", kind, message)
      assert.is_true(took < 1, ("took %.3f s with a 5 s timeout"):format(took))
      local stats = client:stats()
      assert.equal(1, stats.no_route)
      assert.equal(0, stats.retries)
      assert.equal(1, stats.calls)
    end
  end)

  it("numbers attempts in x-rpc-attempt only for calls with retries, and says it over a caller's header", function()
    local T = H.scope(finally)
    local queue = H.queue("header")
    T:server(queue, function(_, request) return tostring(request.headers["x-rpc-attempt"]) end)
    local client = T:client(queue)
    assert.equal("nil", client:call("x", 2))
    assert.equal("1", client:call("x", 2, {retries = 3}))
    assert.equal("1", client:call("x", 2, {retries = 3, headers = {["x-rpc-attempt"] = "mine"}}))
    assert.equal("mine", client:call("x", 2, {headers = {["x-rpc-attempt"] = "mine"}}))
    local with = T:client(queue, {retries = 2})
    assert.equal("1", with:call("x", 2))
    assert.equal("nil", with:call("x", 2, {retries = 0}))
    assert.equal(0, client:stats().retries + with:stats().retries)
  end)

  it("never retries past the deadline: retries = 100 against no server ends with 'no_route' within the timeout", function()
    local T = H.scope(finally)
    local client = T:client(H.queue("never"), {retries = 100})
    local took, reply, message, kind = H.timed(client.call, client, "x", 0.5)
    assert.is_nil(reply)
    assert.equal("no_route", kind, message)
    assert.is_true(took < 0.5 + 0.1, ("a 0.5 s call took %.3f s"):format(took))
    local stats = client:stats()
    -- backed off: 25-50 ms before the first retry, doubling; not a hundred in a tight loop
    assert.is_true(stats.retries >= 2 and stats.retries <= 6, ("%d retries"):format(stats.retries))
    assert.equal(stats.retries + 1, stats.no_route)
    assert.equal(1, stats.calls)
    assert.equal(0, stats.timeouts)
  end)

  it("inside a handler, never retries past the served request's deadline", function()
    local T = H.scope(finally)
    local front, nobody = H.queue("bounded"), H.queue("nobody")
    local backend = T:client(nobody, {retries = 100})
    T:server(front, function()
      local t0 = rpc.now()
      local _, _, kind = backend:call("x", 10)
      return ("%s %.3f"):format(kind, rpc.now() - t0)
    end)
    local client = T:client(front)
    local reply, message, kind = client:call("go", 0.6)
    assert.is_string(reply, tostring(kind) .. ": " .. tostring(message))
    local got, took = reply:match("^(%S+) (%S+)$")
    assert.equal("no_route", got)
    assert.is_true(tonumber(took) < 0.6, reply)
    assert.is_true(backend:stats().retries >= 2, ("%d retries"):format(backend:stats().retries))
  end)

  it("a call with retries inside a handler suspends only that handler between attempts", function()
    local T = H.scope(finally)
    local front, back, ping = H.queue("front"), H.queue("back"), H.queue("ping")
    local backend = T:client(back, {retries = 20})
    T:server(front, function(body)
      local reply, message, kind = backend:call(body, 6)
      return reply or error(kind .. ": " .. message, 0)
    end)
    T:server(ping, function(body) return "pong:" .. body end)
    local child = T:spawn {code = [[
      local function exists(path) local f = io.open(path) if f then f:close() end return f ~= nil end
      while not exists(DIR .. "/go") do sleep(0.02) end
    ]] .. late_server(0), queue = back}
    local client, pinger = T:client(front), T:client(ping)
    local id = assert(client:send("job", {timeout = 8}))
    local worst, pings, t0 = 0, 0, H.now()
    while H.now() - t0 < 0.8 do  -- the front handler backs off meanwhile: no backend yet
      local took, reply, message, kind = H.timed(pinger.call, pinger, "p" .. pings, 2)
      assert.equal("pong:p" .. pings, reply, tostring(kind) .. ": " .. tostring(message))
      worst, pings = math.max(worst, took), pings + 1
    end
    local during = backend:stats().retries
    assert.is_true(during >= 2, ("%d retries in 0.8 s"):format(during))
    assert.is_true(worst < 0.15, ("a ping took %.3f s while the handler backed off"):format(worst))
    H.write_file(child.dir .. "/go", "")
    local reply, message, kind = client:wait(id)
    assert.is_string(reply, tostring(kind) .. ": " .. tostring(message))
    assert.is_true(attempt_of(reply, "job") > during, reply)
    assert.equal(attempt_of(reply, "job") - 1, backend:stats().retries)
  end)

  it("a call with retries in a cqueues coroutine yields between attempts and succeeds once served", function()
    local cqueues = require "cqueues"
    local rcq = require "rpc.cqueues"
    local T = H.scope(finally)
    local queue = H.queue("rcq-late")
    local client = T:client(queue, {retries = 20})
    local cq = cqueues.new()
    local result, ticks, server = nil, 0, nil
    cq:wrap(function()
      result = {client:call("cq", 5)}
      if server then server:close() end  -- ends rcq.serve's coroutine
    end)
    cq:wrap(function()
      cqueues.sleep(0.4)
      if result then return end  -- the call gave up already (it should not): nothing to serve
      server = assert(rpc.server(queue, function(body, request)
        return body .. ":" .. request.headers["x-rpc-attempt"]
      end, H.opts()))
      T:defer(function() server:close() end)
      rcq.serve(cq, server)
    end)
    cq:wrap(function()
      local t0 = H.now()
      while not result and H.now() - t0 < 10 do cqueues.sleep(0.02) ticks = ticks + 1 end
      if server then server:close() end  -- whatever happened, the loop ends
    end)
    local ok, err = cq:loop()
    assert.is_true(ok, tostring(err))
    assert.is_string(result[1], tostring(result[3]) .. ": " .. tostring(result[2]))
    assert.is_true(attempt_of(result[1], "cq") > 1, result[1])
    assert.is_true(client:stats().retries >= 2)
    assert.is_true(ticks >= 10, ("the other coroutine ticked %d times"):format(ticks))
  end)

  it("with confirm = true, sends a request the broker refused (basic.nack) again once the full queue has room", function()
    local T = H.scope(finally)
    local queue = H.queue("full")
    local conn = assert(rpc.connect(H.opts()))
    T:defer(function() conn:close() end)
    assert(conn:declare_queue(queue, {arguments = load("return " .. FULL_ARGS)()}))
    assert(conn:publish("", queue, "filler"))  -- no reply_to, no expiration: it stays
    H.wait_until(function() return H.amqp1 {op = "count", queue = queue}.messages == 1 end, 5,
      "the filler in the queue")
    local child = T:spawn {code = late_server(0.3, FULL_ARGS), queue = queue}
    child:wait_file("started")
    local client = T:client(queue, {confirm = true, retries = 8})
    local reply, message, kind = client:call("job", 3)
    assert.is_string(reply, ("%s: %s"):format(kind, message))
    assert.is_true(attempt_of(reply, "job") > 1, reply)
    assert.equal(attempt_of(reply, "job") - 1, client:stats().retries)
    assert.equal(0, client:stats().no_route)  -- the queue was there: nacks, not returns
  end)

  it("with confirm = true, a nacked request is retried until the deadline, then fails with 'broker'", function()
    local T = H.scope(finally)
    local queue = H.queue("stays-full")
    local conn = assert(rpc.connect(H.opts()))
    T:defer(function() conn:close() end)
    assert(conn:declare_queue(queue, {arguments = load("return " .. FULL_ARGS)()}))
    assert(conn:publish("", queue, "filler"))
    local client = T:client(queue, {confirm = true, retries = 100})
    local took, reply, message, kind = H.timed(client.call, client, "x", 0.6)
    assert.is_nil(reply)
    assert.equal("broker", kind)
    assert.matches("basic.nack", message, 1, true)
    assert.is_true(took < 0.6 + 0.1, ("a 0.6 s call took %.3f s"):format(took))
    assert.is_true(client:stats().retries >= 2, ("%d retries"):format(client:stats().retries))
    assert.equal(1, H.amqp1 {op = "count", queue = queue}.messages)  -- none of them got in
  end)

  it("never retries a nack through an exchange: another queue the request reached may have run it", function()
    local T = H.scope(finally)
    local exchange, queue, full = "spec-retry-x-" .. H.hex(4), H.queue("x-served"), H.queue("x-full")
    local conn = assert(rpc.connect(H.opts()))
    T:defer(function() conn:close() end)
    T:defer(function() H.amqp1 {op = "delete_exchange", exchange = exchange} end)
    local ran = 0
    T:server(queue, function(body) ran = ran + 1 return body end,
             {bind = {exchange = exchange, type = "topic", routing_key = "job.*"}})
    assert(conn:declare_queue(full, {arguments = load("return " .. FULL_ARGS)()}))
    assert(conn:bind(full, exchange, "job.*"))
    assert(conn:publish("", full, "filler"))
    local client = T:client("job.pay", {exchange = exchange, confirm = true, retries = 3})
    -- the served queue took it (its handler runs), the full one refused it (a nack): whichever
    -- the client reads first settles the call, but never a second attempt
    local reply, message, kind = client:call("pay-42", 2)
    assert.is_true(reply == "pay-42" or kind == "broker", tostring(message))
    H.wait_until(function() rpc.sleep(0.02) return ran >= 1 end, 2, "the handler to run")
    rpc.sleep(0.3)
    assert.equal(1, ran, "the handler ran more than once")
    assert.equal(0, client:stats().retries)
  end)

  it("retries a call whose connection was lost and could not be made again, once the broker is back", function()
    local T = H.scope(finally)
    local queue = H.queue("reconnect")
    T:server(queue, function(body, request) return body .. ":" .. request.headers["x-rpc-attempt"] end)
    local proxy, port = T:proxy()
    local client = T:client(queue, {url = H.url_with {port = port}, retries = 30})
    assert.equal("warm:1", client:call("warm", 2))
    proxy:kill("TERM")  -- the link goes, and nobody listens on port until the new proxy
    assert.is_number(proxy:wait(5), "the proxy did not exit")
    T:spawn {sh = ("sleep 0.6; exec %s -u %s %d %d"):format(H.PYTHON,
      H.quote(H.ROOT .. "/spec/support/proxy.py"), port, H.PORT)}
    local took, reply, message, kind = H.timed(client.call, client, "back", 8)
    assert.is_string(reply, ("%s: %s"):format(kind, message))
    assert.is_true(attempt_of(reply, "back") > 1, reply)
    assert.is_true(client:stats().retries >= 1)
    assert.is_true(took < 5, ("took %.3f s"):format(took))
  end)

  it("backs off without spinning while its connection is down, and serves the state meanwhile", function()
    local T = H.scope(finally)
    local queue, ping_q = H.queue("down"), H.queue("down-ping")
    local proxy, port = T:proxy()
    local client = T:client(queue, {url = H.url_with {port = port}, retries = 40})
    T:server(queue, function(body) return body end)
    assert.equal("warm", client:call("warm", 2))
    proxy:kill("TERM")  -- nobody listens on its port from now on
    assert.is_number(proxy:wait(5), "the proxy did not exit")
    H.sleep(1.5)  -- the connection's last read is over a second old
    local cpu0 = os.clock()
    local took, reply, _, kind = H.timed(client.call, client, "x", 2)
    local cpu = os.clock() - cpu0
    assert.is_nil(reply)
    assert.equal("connection", kind)
    assert.is_true(took < 2.2, ("took %.3f s"):format(took))
    assert.is_true(cpu < 0.5, ("%.2f s of CPU over a %.2f s call backing off"):format(cpu, took))
    assert.is_true(client:stats().retries >= 2)
  end)

  it("returns 'closed' when a handler the main-thread backoff runs closes the client", function()
    local T = H.scope(finally)
    local nobody, closer_q = H.queue("closed-nobody"), H.queue("closer")
    local victim = T:client(nobody, {retries = 5})
    T:server(closer_q, function() victim:close() return "closed it" end)
    local closer = T:client(closer_q)
    assert(closer:send("close"))  -- handled while victim:call backs off after no_route
    local reply, message, kind = victim:call("x", 3)
    assert.is_nil(reply)
    assert.equal("closed", kind, message)
  end)

  it("retries a call the client would not publish while the broker blocks publishing #slow", function()
    local T = H.scope(finally)
    local queue = H.queue("alarm-retry")
    T:server(queue, function(body, request) return body .. ":" .. request.headers["x-rpc-attempt"] end)
    local client = T:client(queue, {retries = 30})
    assert.equal("before:1", client:call("before", 5))
    T:defer(function() H.ctl("set_vm_memory_high_watermark", "0.4") end)
    local out, status = H.ctl("set_vm_memory_high_watermark", "0.00001")  -- a memory alarm
    assert.equal(0, status, out)
    H.wait_until(function()
      return select(3, client:call("during", 1, {retries = 0})) == "blocked"
    end, 15, "the broker to block publishing")
    local lift = T:spawn {sh = H.quote(H.BROKER) .. " ctl set_vm_memory_high_watermark 0.4"}
    local reply, message, kind = client:call("after", 15)
    assert.is_string(reply, ("%s: %s"):format(kind, message))
    assert.is_true(attempt_of(reply, "after") > 1, reply)
    assert.equal(0, lift:wait(10), lift:output())
  end)

  describe("bad arguments", function()
    it("opts.retries must be an integer from 0 to 100", function()
      local T = H.scope(finally)
      local queue = H.queue("bad")
      for _, case in ipairs {{-1, "must be between 0 and 100"}, {101, "must be between 0 and 100"},
                             {1.5, "must be an integer, got number"}, {"3", "must be an integer, got string"},
                             {true, "must be an integer, got boolean"}} do
        local err = H.error_of(function() T:client(queue, {retries = case[1]}) end)
        assert.matches("bad argument #2 to 'client' %(option 'retries' " .. case[2], err)
      end
      assert.equal("rpc.client", getmetatable(T:client(queue, {retries = 100})).__name)
    end)

    it("callopts.retries must be an integer from 0 to 100, and is for call only", function()
      local T = H.scope(finally)
      local client = T:client(H.queue("bad"))
      for _, case in ipairs {{-1, "must be between 0 and 100"}, {101, "must be between 0 and 100"},
                             {0.5, "must be an integer, got number"}, {{}, "must be an integer, got table"}} do
        local err = H.error_of(function() client:call("x", 1, {retries = case[1]}) end)
        assert.matches("bad argument #3 to 'call' %(option 'retries' " .. case[2], err)
      end
      assert.matches("bad argument #3 to 'call_all' %(option 'retries' is for call only%)",
        H.error_of(function() client:call_all({"x"}, 1, {retries = 1}) end))
      assert.matches("bad argument #2 to 'send' %(option 'retries' is for call only%)",
        H.error_of(function() client:send("x", {retries = 1}) end))
      assert.matches("bad argument #2 to 'send' %(option 'retries' is for call only%)",
        H.error_of(function() client:send("x", {retries = 0}) end))
      assert.equal(0, client:stats().calls)  -- nothing was sent
    end)
  end)
end)
