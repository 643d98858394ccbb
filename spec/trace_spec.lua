-- W3C Trace Context over AMQP headers: a request's traceparent (and tracestate) reach the
-- handler in request.headers, the calls its handler makes continue the trace under new parent
-- ids, and the reply carries the trace id back. A malformed traceparent is ignored.
local H = require "support.helpers"
local rpc = require "rpc"

local TRACEPARENT = "^00%-(%x+)%-(%x+)%-(%x%x)$"

local function parts(traceparent)
  local trace_id, parent_id, flags = tostring(traceparent):match(TRACEPARENT)
  assert(trace_id and #trace_id == 32 and #parent_id == 16 and not trace_id:find("[A-F]"),
         "not a version-00 traceparent: " .. tostring(traceparent))
  return trace_id, parent_id, flags
end

-- A front server (queue front) whose handler calls a back server (queue back) in this state;
-- both record the headers of the requests they get.
local function front_and_back(T, front_q, back_q, opts)
  local seen = {}
  T:server(back_q, function(body, request)
    seen.back = request.headers or {}
    return "back"
  end)
  local back = T:client(back_q)
  T:server(front_q, function(body, request)
    seen.front = request.headers or {}
    seen.inner = {back:call("x", 5, {properties = true})}
    return "front"
  end, opts)
  return seen
end

describe("trace context", function()
  teardown(H.cleanup)

  it("continues a pika caller's trace through a Lua server into its nested call, and back in the reply", function()
    local T = H.scope(finally)
    local front_q, back_q, replies = H.queue("tr-front"), H.queue("tr-back"), H.queue("tr-replies")
    local seen = front_and_back(T, front_q, back_q, {reply_to_allow = replies})
    local trace_id, parent_id = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
    local traceparent = "00-" .. trace_id .. "-" .. parent_id .. "-01"
    -- a pika caller: the tutorial's client with the two headers
    H.amqp {{op = "declare", queue = replies},
            {op = "publish", routing_key = front_q, body = "x",
             properties = {reply_to = replies, correlation_id = "t1",
                           headers = {traceparent = traceparent, tracestate = "congo=t61rcWkgMzE,rojo=00f067aa0ba902b7"}}}}
    H.wait_until(function() rpc.sleep(0.02) return seen.inner end, 5, "the front handler to end")
    -- the handler sees them as they came
    assert.equal(traceparent, seen.front.traceparent)
    assert.equal("congo=t61rcWkgMzE,rojo=00f067aa0ba902b7", seen.front.tracestate)
    -- the nested request: same trace, another parent id (the front server's span, which its
    -- reply names), the same flags and tracestate
    local inner_trace, inner_parent, inner_flags = parts(seen.back.traceparent)
    assert.equal(trace_id, inner_trace)
    assert.are_not.equal(parent_id, inner_parent)
    assert.equal("01", inner_flags)
    assert.equal("congo=t61rcWkgMzE,rojo=00f067aa0ba902b7", seen.back.tracestate)
    -- the nested reply carries the trace back to the front handler
    assert.equal("back", seen.inner[1])
    assert.equal(trace_id, (parts(seen.inner[2].headers.traceparent)))
    -- and the reply to the pika caller too
    local got = H.amqp1 {op = "get", queue = replies, timeout = 5}
    assert.equal("front", got.body)
    local reply_trace, reply_parent = parts(got.properties.headers.traceparent)
    assert.equal(trace_id, reply_trace)
    assert.are_not.equal(parent_id, reply_parent)
    assert.equal(inner_parent, reply_parent, "the nested call's parent is the span the reply names")
  end)

  it("makes a handler's calls children of the server's span, which its reply names; only the sampled flag passes on", function()
    local T = H.scope(finally)
    local q, back_q = H.queue("tr-many"), H.queue("tr-many-back")
    local parents = {}
    T:server(back_q, function(body, request) parents[#parents + 1] = request.headers.traceparent return "" end)
    local back = T:client(back_q)
    T:server(q, function()
      for _ = 1, 3 do back:call("x", 5) end
      return "ok"
    end)
    local a = T:client(q)
    local spans = {}
    for _, case in ipairs {{"00", "00"}, {"01", "01"}, {"ff", "01"}, {"fe", "00"}} do
      parents = {}
      local sent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-" .. case[1]
      local reply, props = a:call("x", 5, {headers = {traceparent = sent}, properties = true})
      assert.equal("ok", reply)
      local reply_trace, span, reply_flags = parts(props.headers.traceparent)
      assert.equal("0af7651916cd43dd8448eb211c80319c", reply_trace)
      assert.are_not.equal("b7ad6b7169203331", span)
      assert.equal(case[2], reply_flags, "flags " .. case[1])
      assert.is_nil(spans[span], "a span id used for two requests")
      spans[span] = true
      assert.equal(3, #parents)
      for _, tp in ipairs(parents) do
        local trace_id, parent_id, flags = parts(tp)
        assert.equal("0af7651916cd43dd8448eb211c80319c", trace_id)
        assert.equal(span, parent_id, "a nested call's parent is the server's span")
        assert.equal(case[2], flags, "flags " .. case[1])
      end
    end
  end)

  it("ignores a malformed traceparent: no trace is continued, and nothing breaks", function()
    local T = H.scope(finally)
    local front_q, back_q = H.queue("tr-bad"), H.queue("tr-bad-back")
    local seen = front_and_back(T, front_q, back_q)
    local a = T:client(front_q)
    local bad = {
      "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",   -- upper case
      "00-00000000000000000000000000000000-00f067aa0ba902b7-01",   -- all-zero trace id
      "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",   -- all-zero parent id
      "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",   -- version ff
      "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-x", -- version 00 with more
      "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",      -- too short
      "00_4bf92f3577b34da6a3ce929d0e0e4736_00f067aa0ba902b7_01",   -- separators
      "", ("x"):rep(5000), "00-4bf92f3577b34da6a3ce929d0e0e473g-00f067aa0ba902b7-01",
    }
    for _, traceparent in ipairs(bad) do
      seen.inner = nil
      local reply, props = a:call("x", 5, {headers = {traceparent = traceparent, tracestate = "a=b"}, properties = true})
      assert.equal("front", reply, traceparent)
      assert.equal(traceparent, seen.front.traceparent)
      assert.is_nil(seen.back.traceparent, "a trace continued from " .. traceparent)
      assert.is_nil(seen.back.tracestate)
      assert.is_nil(props.headers and props.headers.traceparent, "the reply traced " .. traceparent)
    end
    -- a later version may add fields: accepted, continued as version 00
    a:call("x", 5, {headers = {traceparent = "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-future"}})
    assert.equal("4bf92f3577b34da6a3ce929d0e0e4736", (parts(seen.back.traceparent)))
  end)

  it("starts a new trace per call with opts.trace, sends a caller's own traceparent as given, and none otherwise", function()
    local T = H.scope(finally)
    local q = H.queue("tr-client")
    local got = {}
    T:server(q, function(body, request) got[#got + 1] = request.headers.traceparent or false return "ok" end)
    local traced = T:client(q, {trace = true})
    local _, props = traced:call("1", 5, {properties = true})
    traced:call("2", 5)
    local t1, p1, f1 = parts(got[1])
    local t2 = parts(got[2])
    assert.equal("01", f1)
    assert.are_not.equal(t1, t2)
    assert.equal(t1, (parts(props.headers.traceparent)))
    assert.are_not.equal(p1, select(2, parts(props.headers.traceparent)))
    local mine = "00-11111111111111111111111111111111-2222222222222222-01"
    traced:call("3", 5, {headers = {traceparent = mine}})
    assert.equal(mine, got[3])
    local plain = T:client(q)
    plain:call("4", 5)
    assert.is_false(got[4])
    assert.error_matches(function() rpc.client(q, H.opts {trace = "yes"}) end, "bad argument #2 to 'client'")
  end)
end)
