-- make memcheck: a call loop and every failure path, run under valgrind by scripts/memcheck.sh.
package.path = "lua/?.lua;" .. package.path
package.cpath = "build/?.so;" .. package.cpath
local rpc = require "rpc"
local calls = tonumber(arg[1]) or 300
local q = "memcheck-" .. os.time()

local server = assert(rpc.server(q, function(body, request)
  if body == "raise" then error({}) end
  return body .. (request.headers and request.headers.k or "")
end, {auto_delete = true, reply_to_allow = q .. "-replies", max_body = 100000}))
for _, mode in ipairs { "direct", "exclusive", q .. "-replies" } do
  local client <close> = assert(rpc.client(q, {reply_to = mode}))
  for i = 1, calls do assert(client:call(("x"):rep(i * 100), 5, {headers = {k = "v"}})) end
  assert(client:call("raise") == nil)
  assert(select(3, client:call("x", 1, {routing_key = q .. "-nobody"})) == "no_route")
  assert(not pcall(client.call, client, {}))
  assert(select(3, client:call(("x"):rep(100001))) == "too_large")  -- refused by the server
end
local small <close> = assert(rpc.client(q, {max_body = 10}))
assert(select(3, small:call(("x"):rep(11))) == "too_large")        -- refused before sending
assert(select(3, small:call("0123456789", 5, {headers = {k = "vvv"}})) == "too_large")  -- reply
local refused = assert(rpc.client(q, {reply_to = q .. "-other"}))     -- not allowed: no reply
assert(select(3, refused:call("x", 0.3)) == "timeout")
refused:close()
local port = os.getenv("RPC_BROKER_PORT") or 5673
assert(select(3, rpc.client(q, {url = "amqps://guest:guest@localhost:" .. port .. "/"})) == "tls")
assert(select(3, rpc.client(q, {url = "amqps://guest:guest@localhost:" .. port .. "/",
                                 tls = {ca = "/nonexistent/ca.pem"}})) == "tls")
local late = assert(rpc.client(q .. "-slow"))
local slow = assert(rpc.server(q .. "-slow", function(body) return body end,
  {arguments = {["x-expires"] = 10000}}))  -- outlives its consumer, then expires
slow:close()  -- closed: nobody serves, requests time out
assert(select(3, late:call("x", 0.2)) == "timeout")
assert(select(3, rpc.client(q, {url = "amqp://guest:wrong@localhost:" .. (os.getenv("RPC_BROKER_PORT") or 5673) .. "/"})) == "auth")
assert(select(3, rpc.client(q, {url = "amqp://guest:guest@localhost:1/"})) == "connection")
do  -- rpc.connect: declare, publish, consume, receive, ack, a message kept unreceived, failures
  local conn <close> = assert(rpc.connect({max_body = 1000}))
  assert(conn:declare_exchange(q .. "-x", "topic", {auto_delete = true}))
  local mq = assert(conn:declare_queue("", {exclusive = true}))
  assert(conn:bind(mq, q .. "-x", "#"))
  assert(conn:consume(mq, {prefetch = 10}))
  for i = 1, calls do
    assert(conn:publish(q .. "-x", "k." .. i, ("m"):rep(i), {headers = {i = i}, content_type = "t"}))
    local m = assert(conn:receive(5))
    assert(conn:ack(m.delivery_tag))
  end
  assert(select(3, conn:publish(q .. "-x", "k", ("m"):rep(1001))) == "too_large")
  local big = assert(rpc.connect())
  assert(big:publish(q .. "-x", "k", ("m"):rep(2000)))
  assert(select(3, conn:receive(5)) == "too_large")   -- rejected, never buffered
  assert(conn:publish("", mq, "kept"))
  assert(conn:declare_queue(q .. "-y", {auto_delete = true}))  -- "kept" may arrive meanwhile
  assert(select(3, conn:declare_exchange(q .. "-x", "fanout")) == "broker")
  assert(conn:declare_queue(q .. "-z", {auto_delete = true}))  -- reconnected
  big:close()
end
do  -- sends nobody waits for, swept once past their deadline; arguments and bindings copied into C
  local sender <close> = assert(rpc.client(q))
  for _ = 1, 200 do assert(sender:send("unwaited", {timeout = 0.001})) end
  local t = os.clock() + 0.05
  repeat until os.clock() > t   -- past every deadline
  for _ = 1, 200 do assert(sender:send("more", {timeout = 0.001})) end
  local bound = assert(rpc.server("", function(body) return body end,
    {arguments = {["x-max-length"] = 100, k = "copied"}, bind = {exchange = q .. "-b", type = "fanout"}}))
  bound:close()
end
do  -- a stale delivery tag after a reconnect of rpc.connect
  local conn <close> = assert(rpc.connect())
  local mq = assert(conn:declare_queue(q .. "-stale", {auto_delete = true}))
  assert(conn:consume(mq))
  assert(conn:publish("", mq, "m"))
  local m = assert(conn:receive(5))
  assert(select(3, conn:ack(m.delivery_tag + (1 << 40))) == "stale")
  assert(conn:ack(m.delivery_tag))
end
do  -- handler threads: suspended in nested calls and sleeps, one closed by a script, a drop
  local back = assert(rpc.server(q .. "-back", function(body) rpc.sleep(0.01) return body end,
                                 {auto_delete = true, prefetch = 10}))
  local backend <close> = assert(rpc.client(q .. "-back"))
  local front = assert(rpc.server(q .. "-front", function(body)
    if body == "close me" then coroutine.close(coroutine.running()) end
    return assert(backend:call(body, 5)) .. assert(backend:call_all({"a", "b"}, 5))[2]
  end, {auto_delete = true, prefetch = 10}))
  local caller <close> = assert(rpc.client(q .. "-front"))
  local ids = {}
  for i = 1, 20 do ids[i] = assert(caller:send("n" .. i)) end
  for i = 1, 20 do assert(caller:wait(ids[i]) == "n" .. i .. "b") end
  assert(caller:call("close me", 5) == nil)
  assert(rpc.sleep(0.02))
  front:close()
  back:close()
end
do  -- batched acks and queued replies (the server's own poll), a codec, reply properties
  local batch = assert(rpc.server(q .. "-batch", function(v) return {echo = v}, {headers = {h = "x"}} end,
                                  {auto_delete = true, prefetch = 50, codec = "json"}))
  local client <close> = assert(rpc.client(q .. "-batch", {codec = "json"}))
  local ids = {}
  for i = 1, 100 do ids[i] = assert(client:send({n = i}, {properties = true})) end
  while batch:stats().replies < 100 do assert(batch:poll(1)) end
  for i = 1, 100 do
    local reply, props = client:wait(ids[i], 5)
    assert(reply.echo.n == i and props.headers.h == "x")
  end
  for i = 1, 10 do assert(client:send({n = i})) end  -- some still buffered at close
  assert(batch:poll(0))
  batch:close()
end
do  -- deadlines, traces, retries, latency figures, expired and poisoned requests
  local inner = assert(rpc.server(q .. "-inner", function(body) return body end, {auto_delete = true}))
  local to_inner <close> = assert(rpc.client(q .. "-inner"))
  local outer = assert(rpc.server(q .. "-outer", function(body, request)
    assert(request.deadline and rpc.remaining())
    if body == "late" then rpc.sleep(0.3) end
    return to_inner:call(body) or "past"  -- cut to the remainder; past it: at once
  end, {auto_delete = true, prefetch = 10}))
  local traced <close> = assert(rpc.client(q .. "-outer", {trace = true}))
  for i = 1, 50 do
    assert(traced:call("t" .. i, 5, {properties = true, headers = {tracestate = "a=b"}}))
  end
  assert(select(3, traced:call("late", 0.2)) == "timeout")
  assert(rpc.sleep(0.3))
  assert(traced:stats().latency.count >= 50 and outer:stats().handler_time.count >= 50)
  local retrying <close> = assert(rpc.client(q .. "-nobody", {retries = 3, confirm = true}))
  assert(select(3, retrying:call("x", 0.5, {headers = {k = "v"}})) == "no_route")
  -- a blocking handler lets the next request expire in the prefetch window (past its deadline
  -- by more than the 0.5 s of clock skew a server allows: else it may run, and its reply beat
  -- the wait that expects the timeout)
  local blocking = assert(rpc.server(q .. "-block", function(body)
    if body == "block" then local t = os.clock() + 0.7 repeat until os.clock() > t end
    return body
  end, {auto_delete = true, prefetch = 5}))
  local c <close> = assert(rpc.client(q .. "-block"))
  local a = assert(c:send("block", {timeout = 5}))
  local b = assert(c:send("expire", {timeout = 0.05}))
  assert(c:wait(a) == "block" and select(3, c:wait(b)) == "timeout")
  assert(rpc.sleep(0.1))
  assert(blocking:stats().expired == 1)
  blocking:close()
  -- a redelivery (its server closed mid-request) copied with a count, then poisoned at once
  local pq = q .. "-poison"
  local first = assert(rpc.server(pq, function() rpc.sleep(10) return "" end, {max_deliveries = 1}))
  local pc <close> = assert(rpc.client(pq))
  local id = assert(pc:send("boom", {timeout = 5}))
  assert(rpc.sleep(0.1))
  first:close()
  local second = assert(rpc.server(pq, function() return "ran" end, {max_deliveries = 1}))
  assert(select(3, pc:wait(id)) == "poisoned")
  second:close()
  local deleter <close> = assert(rpc.connect())
  assert(deleter:delete_queue(pq))
  outer:close()
  inner:close()
end
do  -- coalesced sends: a ring of sends and waits (queued sends), flush, a send queued at close
  local ring = assert(rpc.client(q))
  local ids = {}
  for i = 1, 20 do ids[i] = assert(ring:send("r" .. i)) end
  for i = 1, calls do
    local k = (i - 1) % 20 + 1
    local reply, _, kind = ring:wait(ids[k])  -- within the send's own timeout
    assert(reply or kind == "timeout")
    ids[k] = assert(ring:send("r" .. i, {timeout = i % 7 == 0 and 0.001 or 5}))  -- some expire queued
  end
  assert(ring:flush())
  for k = 1, 20 do ring:wait(ids[k]) end
  local x, y = assert(ring:send("x")), assert(ring:send("y"))
  assert(ring:wait(x, 5))
  assert(ring:send("at close"))
  ring:close()
  assert(y)
end
server:close()
rpc.server(q .. "-gc", function() return "" end, {auto_delete = true})  -- left open: freed by lua_close
print("memcheck: done")
