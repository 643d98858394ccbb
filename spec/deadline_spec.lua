-- Deadlines that travel: every request carries its absolute deadline (header x-rpc-deadline,
-- milliseconds since the epoch); a handler's calls get at most the time its request has left;
-- a server skips requests whose caller has already given up.
local H = require "support.helpers"
local rpc = require "rpc"

local SLICE = 0.2  -- the loop's longest sleep between deadline checks (RPC_SLICE)

local function wall()
  return tonumber(H.run("date +%s.%N"):match("[%d.]+"))
end

describe("deadlines", function()
  teardown(H.cleanup)

  it("end a nested call at the outer caller's deadline: A calls B with 1 s, B calls C without a timeout, C hangs", function()
    local T = H.scope(finally)
    local b_q, c_q = H.queue("dl-b"), H.queue("dl-c")
    -- C and B in a child process of their own; C records when each request reached it
    local child = T:spawn {code = ([[
      local c_calls = 0
      local c = assert(rpc.server(%q, function(body, request)
        c_calls = c_calls + 1
        local f = assert(io.open(DIR .. "/c" .. c_calls, "w"))
        f:write(string.format("%%.3f %%s", rpc.remaining() or -1, request.deadline))
        f:close()
        rpc.sleep(20)
        return "c"
      end, {url = URL, prefetch = 10}))
      local to_c = assert(rpc.client(%q, {url = URL}))
      local b = assert(rpc.server(QUEUE, function(body, request)
        local t0 = rpc.now()
        local reply, message, kind = to_c:call(body)              -- no timeout: the remainder
        local took = rpc.now() - t0
        local again, message2, kind2 = to_c:call("again", 30)   -- after the deadline: at once
        local f = assert(io.open(DIR .. "/b", "w"))
        f:write(string.format("%%s|%%s|%%.3f|%%s|%%s|%%s", tostring(reply), kind, took,
                              tostring(again), kind2, message2))
        f:close()
        return "b"
      end, {url = URL, prefetch = 10}))
      ready()
      rpc.serve(%q, function() return "" end, {url = URL})  -- serves b and c too
    ]]):format(c_q, c_q, H.queue("dl-idle")), queue = b_q}:wait_ready()
    local a = T:client(b_q)
    local t0 = H.now()
    local reply, message, kind = a:call("x", 1)
    local outer_deadline = t0 + 1
    local line = H.wait_until(function() return H.read_file(child.dir .. "/b") end, 5, "B's record")
    -- B's call ends at A's deadline and B replies at once: A, at its deadline too, may read
    -- that reply first (a wait takes a reply in hand before it looks at the clock)
    assert.is_true(reply == "b" or kind == "timeout", tostring(message))
    local inner_reply, inner_kind, took, again, again_kind, again_message = line:match("^(.-)|(.-)|(.-)|(.-)|(.-)|(.*)$")
    assert.equal("nil", inner_reply)
    assert.equal("timeout", inner_kind)
    -- B's call to C ended at A's deadline (it started a little after t0), not after 30 s
    took = tonumber(took)
    assert.is_true(took > 0.8 and took < 1 + SLICE, ("B's call to C took %.3f s"):format(took))
    assert.is_true(H.now() < outer_deadline + 2 * SLICE + 0.5, "B's record came late")
    -- after the deadline, another call fails at once, unpublished
    assert.equal("nil", again)
    assert.equal("timeout", again_kind)
    assert.matches("past its deadline", again_message)
    -- C was called exactly once, before A's deadline, with the remainder and the deadline
    H.sleep(0.3)
    assert.is_nil(H.read_file(child.dir .. "/c2"), "C was called after A's deadline")
    local remaining, deadline = H.read_file(child.dir .. "/c1"):match("^(%S+) (%S+)$")
    remaining, deadline = tonumber(remaining), tonumber(deadline)
    assert.is_true(remaining > 0.5 and remaining <= 1.01, ("C saw %.3f s remaining"):format(remaining))
    local now = wall()
    assert.is_true(deadline > now - 1.5 and deadline < now, ("C's request.deadline %.3f, now %.3f"):format(deadline, now))
  end)

  it("let a handler's explicit smaller timeout win, and cut a larger one to the time left", function()
    local T = H.scope(finally)
    local q, hang_q = H.queue("dl-cut"), H.queue("dl-hang")
    T:server(hang_q, function() rpc.sleep(20) return "late" end, {prefetch = 10})
    local hang = T:client(hang_q)
    local took = {}
    T:server(q, function(body)
      local t0 = rpc.now()
      local _, _, kind = hang:call("x", tonumber(body))
      took[#took + 1] = {rpc.now() - t0, kind}
      return "done"
    end, {prefetch = 10})
    local a = T:client(q)
    -- smaller: 0.2 s of the 1.5 s left
    assert.equal("done", a:call("0.2", 1.5))
    assert.equal("timeout", took[1][2])
    assert.is_true(took[1][1] < 0.2 + SLICE, ("the 0.2 s call took %.3f s"):format(took[1][1]))
    -- larger: 30 s cut to the 0.8 s left (A's call ends at the same moment: timeout)
    local t0 = H.now()
    local reply, _, kind = a:call("30", 0.8)
    assert.is_nil(reply)
    assert.equal("timeout", kind)
    H.wait_until(function() rpc.sleep(0.02) return took[2] end, 2, "the second handler's call to end")
    assert.equal("timeout", took[2][2])
    assert.is_true(took[2][1] < 0.8 + SLICE, ("the 30 s call, cut, took %.3f s"):format(took[2][1]))
    assert.is_true(H.now() - t0 < 0.8 + 2 * SLICE)
  end)

  it("gives the handler request.deadline (seconds since the epoch) and rpc.remaining()", function()
    local T = H.scope(finally)
    local q = H.queue("dl-fields")
    local seen
    T:server(q, function(body, request)
      seen = {deadline = request.deadline, remaining = rpc.remaining(),
              header = request.headers and request.headers["x-rpc-deadline"]}
      return "ok"
    end)
    local a = T:client(q)
    local before = wall()
    assert.equal("ok", a:call("x", 7))
    assert.is_number(seen.deadline)
    assert.is_true(seen.deadline > before + 6.5 and seen.deadline < before + 7.5, ("deadline %.3f"):format(seen.deadline))
    assert.is_true(math.type(seen.header) == "integer" and math.abs(seen.header / 1000 - seen.deadline) < 0.002)
    assert.is_true(seen.remaining > 6.5 and seen.remaining <= 7.01, ("remaining %.3f"):format(seen.remaining))
    assert.equal(1, select("#", rpc.remaining()))
    assert.is_nil(rpc.remaining(), "rpc.remaining() outside a handler")
  end)

  it("leaves requests without a deadline (a pika caller) unbounded: no request.deadline, nested calls keep their timeouts", function()
    local T = H.scope(finally)
    local q, inner_q, replies = H.queue("dl-pika"), H.queue("dl-pika-inner"), H.queue("dl-pika-replies")
    T:server(inner_q, function(body, request) return request.headers and request.headers["x-rpc-deadline"] or "none" end)
    local inner = T:client(inner_q)
    local seen
    T:server(q, function(body, request)
      local t0 = rpc.now()
      local header = inner:call("x", 3)
      seen = {deadline = request.deadline, remaining = rpc.remaining(), header = header}
      return "ok"
    end, {reply_to_allow = replies})
    H.amqp {{op = "declare", queue = replies},
            {op = "publish", routing_key = q, body = "x", properties = {reply_to = replies, correlation_id = "p1"}}}
    H.wait_until(function() rpc.sleep(0.02) return seen end, 5, "the handler to end")
    local got = H.amqp1 {op = "get", queue = replies, timeout = 5}
    assert.equal("ok", got.body)
    assert.is_nil(seen.deadline)
    assert.is_nil(seen.remaining)
    -- the inner call still carries a deadline of its own: now + 3 s
    local ms = tonumber(seen.header)
    assert.is_true(ms and ms / 1000 > wall() + 1.5, "the nested call's own deadline: " .. tostring(seen.header))
  end)

  it("skips prefetched requests whose deadline passed while a handler blocked the server: acked, no reply, stats.expired", function()
    local T = H.scope(finally)
    local q = H.queue("dl-expired")
    local ran = {}
    local server = T:server(q, function(body)
      ran[#ran + 1] = body
      if body == "slow" then os.execute("sleep 3") end  -- blocks the process: nothing else runs
      return body
    end, {prefetch = 10})
    local a = T:client(q)
    -- all ten go out before the server reads any: its prefetch window takes them together
    local slow = assert(a:send("slow", {timeout = 10}))
    local quick = {}
    for i = 1, 9 do quick[i] = assert(a:send("quick" .. i, {timeout = 1})) end
    local t0 = H.now()
    assert.equal("slow", a:wait(slow))  -- turns the loop: the server takes "slow" and blocks 3 s
    assert.is_true(H.now() - t0 >= 2.9)
    for i = 1, 9 do
      local reply, message, kind = a:wait(quick[i])
      assert.is_nil(reply)
      assert.equal("timeout", kind, message)
    end
    H.wait_until(function() server:poll(0.05) return server:stats().expired == 9 end, 3, "9 expired requests")
    assert.same({"slow"}, ran)
    local stats = server:stats()
    assert.equal(10, stats.requests)
    assert.equal(1, stats.replies)
    assert.equal(0, stats.errors)
    assert.equal(0, a:stats().discarded, "no reply came for the skipped requests")
    server:close()
    assert.equal(0, H.amqp1 {op = "declare", queue = q, passive = true}.messages, "all acked")
  end)

  it("runs a request whose deadline seems up to 0.5 s past (clock skew), and skips one further past", function()
    local T = H.scope(finally)
    local q, replies = H.queue("dl-skew"), H.queue("dl-skew-replies")
    local ran = {}
    local server = T:server(q, function(body) ran[#ran + 1] = body return body end, {reply_to_allow = replies})
    local now_ms = math.floor(wall() * 1000)
    local function request(body, deadline)
      return {op = "publish", routing_key = q, body = body,
              properties = {reply_to = replies, correlation_id = body, headers = {["x-rpc-deadline"] = deadline}}}
    end
    H.amqp {{op = "declare", queue = replies},
            request("skewed", now_ms - 200), request("gone", now_ms - 1500),
            request("text", tostring(now_ms + 60000)), request("junk", "soon"), request("negative", -5),
            request("seconds", now_ms // 1000 - 100), request("hex", "0x1ffffffffff"), request("epoch", 1000),
            request("years-ago", now_ms - 100000000000)}  -- before this host booted
    H.wait_until(function() server:poll(0.05) return #ran + server:stats().expired >= 9 end, 5, "9 requests")
    table.sort(ran)
    assert.same({"epoch", "hex", "junk", "negative", "seconds", "skewed", "text"}, ran)
    assert.equal(2, server:stats().expired)
  end)

  it("publishes a send with the smallest timeout (0.001 s) outside a handler, every time", function()
    local T = H.scope(finally)
    local client = T:client(H.queue("dl-smallest"))
    for i = 1, 200 do  -- once, now + 0.001 - now rounded below 0.001 about one time in two
      local id, message, kind = client:send("x", {timeout = 0.001})
      assert.is_string(id, ("send %d: %s (%s)"):format(i, tostring(message), tostring(kind)))
    end
  end)
end)
