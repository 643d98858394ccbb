-- Latency figures (README "Latency figures"): client:stats().latency, server:stats().handler_time,
-- the x-rpc-handler-time reply header and the split `rabbitrpc call --repeat` prints.
local H = require "support.helpers"
local rpc = require "rpc"

local KEYS = {"count", "max", "p50", "p90", "p99"}
local PRECISION = 0.045   -- a percentile's bucket middle against any value of its bucket

--- The sorted keys of t.
local function keys(t)
  local list = {}
  for k in pairs(t) do list[#list + 1] = k end
  table.sort(list)
  return list
end

--- Fails unless the figures are ordered: max >= p99 >= p90 >= p50 > 0.
local function assert_ordered(f, what)
  local shown = ("%s: p50 %.6f p90 %.6f p99 %.6f max %.6f"):format(what, f.p50, f.p90, f.p99, f.max)
  assert.is_true(f.p50 > 0 and f.p50 <= f.p90 and f.p90 <= f.p99 and f.p99 <= f.max, shown)
end

--- Nearest-rank percentile of a sorted list.
local function percentile(sorted, p)
  return sorted[math.max(1, math.ceil(p / 100 * #sorted))]
end

--- n calls through call_all, batch at a time; every reply must be its body.
local function call_batches(client, n, batch)
  local bodies = {}
  for i = 1, batch do bodies[i] = "b" .. i end
  for _ = 1, n // batch do
    local replies, message, kind = client:call_all(bodies, 30)
    assert(replies, ("call_all: %s (%s)"):format(message, kind))
    assert(replies[batch] == bodies[batch], "a reply is not its body")
  end
end

describe("latency figures", function()
  teardown(H.cleanup)

  it("are empty (count 0, all figures 0) before any call", function()
    local T = H.scope(finally)
    local queue = H.queue("lat-empty")
    local server = T:server(queue, function(body) return body end)
    local client = T:client(queue)
    local empty = {count = 0, p50 = 0, p90 = 0, p99 = 0, max = 0}
    assert.same(empty, client:stats().latency)
    assert.same(empty, server:stats().handler_time)
    assert.equal("integer", math.type(client:stats().latency.count))
  end)

  it("give p50/p99 of 1,000 calls to a handler that sleeps 10 ms within the expected range", function()
    local T = H.scope(finally)
    local queue = H.queue("lat-10ms")
    local server = T:server(queue, function(body)
      rpc.sleep(0.01)
      return body
    end, {prefetch = 10})
    local client = T:client(queue)
    call_batches(client, 1000, 10)   -- 10 in flight, each handler sleeping on its own

    local latency, handler = client:stats().latency, server:stats().handler_time
    assert.same(KEYS, keys(latency))
    assert.same(KEYS, keys(handler))
    assert.equal(1000, latency.count)
    assert.equal(1000, handler.count)
    assert_ordered(latency, "latency")
    assert_ordered(handler, "handler_time")
    -- a handler sleeping 10 ms runs at least that (rpc.sleep never returns early), and its
    -- bucket's middle is at most 4.5 % below the value
    assert.is_true(handler.p50 >= 0.01 * (1 - PRECISION) and handler.p50 < 0.015,
      ("handler_time p50 %.6f s"):format(handler.p50))
    assert.is_true(latency.p50 >= 0.01 * (1 - PRECISION) and latency.p50 < 0.05,
      ("latency p50 %.6f s"):format(latency.p50))
    assert.is_true(latency.p99 < 0.5, ("latency p99 %.6f s"):format(latency.p99))
    -- every call's latency holds its handler's time: so do the figures
    assert.is_true(latency.p50 >= handler.p50 and latency.max >= handler.max,
      ("latency p50 %.6f max %.6f, handler_time p50 %.6f max %.6f")
        :format(latency.p50, latency.max, handler.p50, handler.max))
  end)

  it("agree with the x-rpc-handler-time headers: percentiles within 4.5 %, max exact", function()
    local T = H.scope(finally)
    local queue = H.queue("lat-headers")
    local server = T:server(queue, function(body)
      rpc.sleep(tonumber(body))
      return body
    end, {prefetch = 20})
    local client = T:client(queue)
    local times, ids = {}, {}
    for i = 1, 400 do   -- 0.5 to 10 ms, 20 in flight
      ids[#ids + 1] = assert(client:send(tostring((i % 20 + 1) * 0.0005), {properties = true}))
      if #ids == 20 then
        for _, id in ipairs(ids) do
          local reply, props, kind = client:wait(id)
          assert(reply, ("wait: %s (%s)"):format(props, kind))
          local t = props.headers and props.headers["x-rpc-handler-time"]
          assert.equal("float", math.type(t), "no x-rpc-handler-time header")
          times[#times + 1] = t
        end
        ids = {}
      end
    end
    table.sort(times)
    local handler = server:stats().handler_time
    assert.equal(400, handler.count)
    assert.equal(times[#times], handler.max)
    for _, p in ipairs {50, 90, 99} do
      local exact, shown = percentile(times, p), handler["p" .. p]
      assert.is_true(math.abs(shown - exact) <= PRECISION * exact,
        ("p%d: %.7f s, the headers' %.7f s"):format(p, shown, exact))
    end
    assert.equal(400, client:stats().latency.count)   -- send + wait counts
  end)

  it("count error replies in handler_time but not in latency, nor no-route calls or refused bodies", function()
    local T = H.scope(finally)
    local queue = H.queue("lat-errors")
    local server = T:server(queue, function(body)
      if body == "fail" then
        rpc.sleep(0.05)
        error("refused", 0)
      end
      return body
    end)
    local client = T:client(queue)
    for _, body in ipairs {"a", "fail", "b", "fail", "c"} do
      local reply, message, kind = client:call(body, 5)
      if body == "fail" then
        assert.equal("remote", kind, message)
      else
        assert.equal(body, reply, message)
      end
    end
    local id = assert(client:send("d"))
    assert.equal("d", client:wait(id))
    local reply, message, kind = client:call("x", 5, {routing_key = H.queue("lat-nobody")})
    assert.is_nil(reply)
    assert.equal("no_route", kind, message)

    local stats, handler = client:stats(), server:stats().handler_time
    assert.equal(2, stats.remote_errors)
    assert.equal(1, stats.no_route)
    assert.equal(4, stats.latency.count)   -- a, b, c and the send d
    assert.equal(6, handler.count)         -- the two failures too
    assert.equal(2, server:stats().errors)
    -- the failing handlers ran 50 ms: their time is in handler_time
    assert.is_true(handler.max >= 0.05, ("handler_time max %.6f s"):format(handler.max))
    assert.is_true(handler.p99 >= 0.05 * (1 - PRECISION), ("handler_time p99 %.6f s"):format(handler.p99))

    -- a body the server's codec refuses never reaches the handler: not counted
    local json_queue = H.queue("lat-codec")
    local json_server = T:server(json_queue, function(v) return v end, {codec = "json"})
    local raw = T:client(json_queue)
    reply, message, kind = raw:call("{not json", 5)
    assert.is_nil(reply)
    assert.equal("codec", kind, message)
    assert.equal(0, json_server:stats().handler_time.count)
    assert.equal(0, raw:stats().latency.count)
  end)

  it("put a plausible x-rpc-handler-time on each reply read with properties = true", function()
    local T = H.scope(finally)
    local queue = H.queue("lat-header")
    local server = T:server(queue, function(body)
      rpc.sleep(0.02)
      return body
    end)
    local client = T:client(queue)
    local t0 = rpc.now()
    local reply, props = client:call("x", 5, {properties = true})
    local took = rpc.now() - t0
    assert.equal("x", reply)
    local t = props.headers["x-rpc-handler-time"]
    assert.equal("float", math.type(t))
    assert.is_true(t >= 0.02 and t < took, ("header %.6f s, the call took %.6f s"):format(t, took))
    assert.equal(t, server:stats().handler_time.max)   -- the same figure
    local latency = client:stats().latency
    assert.is_true(latency.max >= t and latency.max <= took,
      ("latency max %.6f s, header %.6f s, the call %.6f s"):format(latency.max, t, took))

    local id = assert(client:send("y", {properties = true}))
    local reply2, props2 = client:wait(id)
    assert.equal("y", reply2)
    assert.is_true(props2.headers["x-rpc-handler-time"] >= 0.02)
  end)

  it("keeps RSS flat over 1,000,000 calls (a recording each in latency and handler_time; not under ASan, whose quarantine holds freed memory) #slow", function()
    local T = H.scope(finally)
    local queue = H.queue("lat-million")
    local server = T:server(queue, function(body) return body end, {prefetch = 500})
    local client = T:client(queue)
    -- a warm-up: the allocator and the pending table settle
    call_batches(client, 50000, 500)
    collectgarbage()
    collectgarbage()
    local rss, heap = H.rss_kb(), collectgarbage("count")
    local took = H.timed(call_batches, client, 1000000, 500)
    collectgarbage()
    collectgarbage()
    local rss_growth, heap_growth = H.rss_kb() - rss, collectgarbage("count") - heap
    local latency, handler = client:stats().latency, server:stats().handler_time
    assert.equal(1050000, latency.count)
    assert.equal(1050000, handler.count)
    assert_ordered(latency, "latency")
    -- a sample kept per call would be 8 MB a histogram
    assert.is_true(rss_growth < 4096, ("RSS grew by %d kB over 1,000,000 calls (%.1f s)"):format(rss_growth, took))
    assert.is_true(heap_growth < 256, ("the Lua heap grew by %.1f kB"):format(heap_growth))
  end)
end)

describe("rabbitrpc call --repeat", function()
  teardown(H.cleanup)

  local function rabbitrpc(args)
    local words = {}
    for i, a in ipairs(args) do words[i] = H.quote(a) end
    return H.run(H.LUA .. " " .. H.quote(H.ROOT .. "/bin/rabbitrpc") .. " " .. table.concat(words, " "))
  end

  it("splits latency into the server's handler time and queue + transport", function()
    local T = H.scope(finally)
    local queue = H.queue("lat-cli")
    local handler = H.tmpdir() .. "/sleep_10ms.lua"
    H.write_file(handler, 'local rpc = require "rpc"\n'
      .. "return function(body) rpc.sleep(0.01) return body end\n")
    local child = T:spawn {script = "bin/rabbitrpc", args = {"serve", queue, "--handler", handler, "--prefetch", "4"}}
    child:wait_output("rabbitrpc: serving")
    local out, status, err = rabbitrpc({"call", queue, "x", "--repeat", "40", "--parallel", "4"})
    assert.equal(0, status, out .. err)
    assert.equal("40", out:match("ok: (%d+)"), out)
    local lat50 = tonumber(out:match("latency: min [%d.]+ p50 ([%d.]+)"))
    local h50, h99 = out:match("\nhandler: p50 ([%d.]+) p99 ([%d.]+) ms\n")
    local r50, r99 = out:match("\nqueue%+transport: p50 ([%d.]+) p99 ([%d.]+) ms\n")
    assert.is_truthy(lat50 and h50 and r50, out)
    h50, h99, r50, r99 = tonumber(h50), tonumber(h99), tonumber(r50), tonumber(r99)
    -- each handler slept 10 ms (figures in ms, printed to 3 decimals)
    assert.is_true(h50 >= 10 and h50 < 30 and h99 >= h50, out)
    -- the rest is each call's latency less its handler's time: under the latency by 10 ms
    assert.is_true(r50 >= 0 and r99 >= r50 and r50 <= lat50 - 10 + 0.002, out)
  end)

  it("says the handler time is unknown when the replies do not carry it", function()
    local T = H.scope(finally)
    local queue = H.queue("lat-pika")
    local server = T:spawn {python = H.ROOT .. "/spec/support/rpc_server.py", queue = queue}
    server:wait_output("Awaiting RPC requests")
    local out, status, err = rabbitrpc({"call", queue, "10", "--repeat", "3"})
    assert.equal(0, status, out .. err)
    assert.equal("3", out:match("ok: (%d+)"), out)
    assert.matches("\nlatency: min [%d.]+ p50", out)
    assert.matches("\nhandler: unknown %(no reply had an x%-rpc%-handler%-time header%)\n", out)
    assert.not_matches("queue%+transport", out)
  end)
end)
