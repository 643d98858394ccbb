-- Pipelined calls: client:send / client:wait and client:call_all, on the same machinery as call.
local H = require "support.helpers"

-- A child echo server on QUEUE (prefetch 100): a body "sleep S rest" sleeps S seconds first.
local CHILD_ECHO = [[
local server = assert(rpc.server(QUEUE, function(body)
  local seconds, rest = body:match("^sleep (%S+) (.*)$")
  if seconds then sleep(tonumber(seconds)) end
  return rest or body
end, {url = URL, prefetch = 100}))
ready()
server:run()
server:close()
]]

local function echo_server(T, queue)
  return T:server(queue, function(body)
    if body == "raise" then error("raised on purpose", 0) end
    return body
  end, {prefetch = 100})
end

describe("client:send and client:wait", function()
  teardown(H.cleanup)

  it("keep 100 requests in flight and give each wait its own reply, in any order", function()
    local T = H.scope(finally)
    local queue = H.queue("pipe")
    echo_server(T, queue)
    local client = T:client(queue)
    local ids = {}
    for i = 1, 100 do ids[i] = client:send("body " .. i) end
    for i = 1, 100 do assert.matches(H.UUID, ids[i]) end
    for i = 100, 1, -1 do assert.equal("body " .. i, client:wait(ids[i], 5)) end
    local stats = client:stats()
    assert.equal(100, stats.calls)
    assert.equal(100, stats.replies)
    assert.equal(0, stats.discarded)
  end)

  it("keep replies for other ids while one wait reads them, across processes", function()
    local T = H.scope(finally)
    local queue = H.queue("pipe-child")
    T:spawn {code = CHILD_ECHO, queue = queue}:wait_ready()
    local client = T:client(queue)
    local fast = {}
    for i = 1, 20 do fast[i] = client:send("fast " .. i) end
    local slow = client:send("sleep 0.3 slow")
    -- one server, in order: the 20 fast replies arrive before the slow one, during its wait,
    -- and are kept for their own waits
    assert.equal("slow", client:wait(slow, 5))
    for i = 1, 20 do assert.equal("fast " .. i, client:wait(fast[i], 0.001)) end
  end)

  it("raise a bad argument when an id is waited twice, unknown, or from another client", function()
    local T = H.scope(finally)
    local queue = H.queue("pipe-twice")
    echo_server(T, queue)
    local client, other = T:client(queue), T:client(queue)
    local id = client:send("once")
    assert.equal("once", client:wait(id, 5))
    assert.matches("bad argument #1 to 'wait' %(unknown id", H.error_of(function() client:wait(id) end))
    assert.matches("bad argument #1 to 'wait'", H.error_of(function() client:wait("not an id") end))
    local foreign = other:send("foreign")
    assert.matches("bad argument #1 to 'wait' %(unknown id", H.error_of(function() client:wait(foreign) end))
    assert.equal("foreign", other:wait(foreign, 5))
    assert.matches("bad argument #1 to 'send' %(string expected, got table%)",
      H.error_of(function() client:send({}) end))
    assert.matches("bad argument #2 to 'send' %(option 'timeout'",
      H.error_of(function() client:send("x", {timeout = -1}) end))
  end)

  it("return 'timeout' from a wait, then discard and count the late reply", function()
    local T = H.scope(finally)
    local queue = H.queue("pipe-late")
    T:spawn {code = CHILD_ECHO, queue = queue}:wait_ready()
    local client = T:client(queue)
    local id = client:send("sleep 0.5 late")
    local elapsed, reply, message, kind = H.timed(client.wait, client, id, 0.2)
    assert.is_nil(reply)
    assert.equal("timeout", kind)
    assert.matches(queue, message, 1, true)
    assert.is_true(elapsed < 0.2 + 0.5, ("took %.3f s"):format(elapsed))
    assert.matches("unknown id", H.error_of(function() client:wait(id) end))
    assert.equal("next", client:call("next", 5))  -- reads, and drops, the late reply first
    assert.equal(1, client:stats().discarded)
    assert.equal(1, client:stats().timeouts)
  end)

  it("time out at the send's own timeout when wait has none", function()
    local T = H.scope(finally)
    local queue = H.queue("pipe-own-timeout")
    assert.is_true(H.amqp1 {op = "declare", queue = queue}.ok)  -- nobody consumes
    local client = T:client(queue)
    local id = client:send("x", {timeout = 0.3})
    H.sleep(0.1)
    local elapsed, reply, _, kind = H.timed(client.wait, client, id)
    assert.is_nil(reply)
    assert.equal("timeout", kind)
    assert.is_true(elapsed > 0.1 and elapsed < 0.2 + 0.3, ("took %.3f s"):format(elapsed))
  end)

  it("give every kind call gives: no_route, remote and closed", function()
    local T = H.scope(finally)
    local queue = H.queue("pipe-kinds")
    echo_server(T, queue)
    local client = T:client(queue)
    local lost = client:send("x", {routing_key = H.queue("nobody")})
    local raised = client:send("raise")
    local fine = client:send("fine")
    assert.equal("remote", select(3, client:wait(raised, 5)))
    assert.equal("no_route", select(3, client:wait(lost, 5)))
    assert.equal("fine", client:wait(fine, 5))
    local pending = client:send("never waited")
    client:close()
    assert.equal("closed", select(3, client:wait(pending)))
    assert.equal("closed", select(3, client:send("x")))
  end)
end)

describe("client:call_all", function()
  teardown(H.cleanup)

  it("returns the replies in the order of the bodies", function()
    local T = H.scope(finally)
    local queue = H.queue("all")
    echo_server(T, queue)
    local client = T:client(queue)
    local bodies = {}
    for i = 1, 50 do bodies[i] = i % 2 == 0 and "b" .. i or i end
    local replies = client:call_all(bodies, 5)
    assert.equal(50, #replies)
    for i = 1, 50 do assert.equal(tostring(bodies[i]), replies[i]) end
    assert.same({}, client:call_all({}))
  end)

  it("returns nil, 'request i of n: ...', kind at the first failure, and drops the rest", function()
    local T = H.scope(finally)
    local queue = H.queue("all-fail")
    echo_server(T, queue)
    local client = T:client(queue)
    local replies, message, kind = client:call_all({"a", "raise", "c"}, 5)
    assert.is_nil(replies)
    assert.equal("remote", kind)
    assert.matches("^request 2 of 3: raised on purpose", message)
    assert.equal("d", client:call("d", 5))  -- the reply to "c" is discarded, not given to this call
    assert.equal(1, client:stats().discarded)
  end)

  it("raises for bodies that are not strings or numbers, before sending any", function()
    local T = H.scope(finally)
    local client = T:client(H.queue("all-bad"))
    assert.matches("bad argument #1 to 'call_all' %(bodies%[2%] must be a string or number, got table%)",
      H.error_of(function() client:call_all({"a", {}}) end))
    assert.equal(0, client:stats().calls)
  end)
end)

describe("latency", function()
  teardown(H.cleanup)

  it("stays far below the 40 ms Nagle stall for sequential calls between processes", function()
    local T = H.scope(finally)
    local queue = H.queue("nodelay")
    T:spawn {code = CHILD_ECHO, queue = queue}:wait_ready()
    local client = T:client(queue)
    local times = {}
    for i = 1, 60 do times[i] = H.timed(client.call, client, ("x"):rep(i * 100), 5) end
    table.sort(times)
    local median, p90 = times[30], times[54]  -- a Nagle stall would put both near 40 ms
    assert.is_true(median < 0.01, ("median %.1f ms"):format(median * 1000))
    assert.is_true(p90 < 0.02, ("90th percentile %.1f ms"):format(p90 * 1000))
  end)
end)
