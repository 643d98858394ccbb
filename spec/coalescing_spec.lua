-- Coalesced sends: a send made while replies wait unread in the client is written with the
-- next wait (or flush(), a loop turn, close), so a ring of send/wait writes once per read.
local H = require "support.helpers"

-- A child server that answers each request with the moment (system.monotime, shared by every
-- process of the machine) it received it, and prints "got <body>".
local CHILD_CLOCK = [[
local server = assert(rpc.server(QUEUE, function(body)
  print("got " .. body)
  return ("%.6f"):format(system.monotime())
end, {url = URL, prefetch = 100}))
ready()
server:run()
server:close()
]]

-- A client whose connection holds an unread reply: a and b are answered while it sleeps (not
-- reading), then the wait for a reads both in one read and leaves b's in the buffer.
local function client_with_a_reply_unread(T, opts)
  local queue = H.queue("coalesce")
  local child = T:spawn {code = CHILD_CLOCK, queue = queue}:wait_ready()
  local client = T:client(queue, opts)
  local a, b = client:send("a"), client:send("b")
  H.wait_until(function() return child:output():find("got b") end, 5, "the server to get b")
  H.sleep(0.3)  -- both replies are in the client's socket
  assert.is_string(client:wait(a, 5))
  return client, b, child
end

-- Sends c and returns when the server got it (seconds after the send), after running
-- between(client), which must not read the client.
local function send_then(client, between)
  local t0 = H.now()
  local c = assert(client:send("c"))
  between(client)
  local got = tonumber(assert(client:wait(c, 5)))
  return got - t0
end

-- Asserts that a send the caller leaves alone for 0.4 s reaches the server within 0.2 s.
local function assert_written_at_once(client)
  local delay = send_then(client, function() H.sleep(0.4) end)
  assert.is_true(delay < 0.2, ("the server got the send %.3f s after it was made"):format(delay))
end

describe("client:send while replies wait unread", function()
  teardown(H.cleanup)

  it("is written with the next wait, not at once", function()
    local T = H.scope(finally)
    local client, b = client_with_a_reply_unread(T)
    local delay = send_then(client, function() H.sleep(0.4) end)
    assert.is_true(delay >= 0.35, ("the server got c %.3f s after the send"):format(delay))
    assert.is_string(client:wait(b, 5))
    local stats = client:stats()
    assert.same({3, 3, 0}, {stats.calls, stats.replies, stats.discarded})
  end)

  it("is written at once by client:flush(), which returns true", function()
    local T = H.scope(finally)
    local client, b = client_with_a_reply_unread(T)
    local delay = send_then(client, function(c)
      assert.is_true(c:flush())
      H.sleep(0.4)
    end)
    assert.is_true(delay < 0.2, ("the server got c %.3f s after the send"):format(delay))
    assert.is_string(client:wait(b, 5))  -- the reply read by flush() is kept for its wait
  end)

  it("is written by anything that turns the loop (rpc.sleep)", function()
    local T = H.scope(finally)
    local client, b = client_with_a_reply_unread(T)
    local rpc = require "rpc"
    local delay = send_then(client, function() assert.is_true(rpc.sleep(0.4)) end)
    assert.is_true(delay < 0.2, ("the server got c %.3f s after the send"):format(delay))
    assert.is_string(client:wait(b, 5))
  end)

  it("is written when the client is closed", function()
    local T = H.scope(finally)
    local client, _, child = client_with_a_reply_unread(T)
    assert.is_string(client:send("closing"))
    client:close()
    child:wait_output("got closing", 5)
  end)

  it("fails with kind 'connection' when the connection is cut before it is written", function()
    local T = H.scope(finally)
    local queue = H.queue("coalesce-cut")
    local child = T:spawn {code = CHILD_CLOCK, queue = queue}:wait_ready()
    local proxy, port = T:proxy()
    local client = T:client(queue, {url = H.url_with {port = port}})
    local a, b = client:send("a"), client:send("b")
    H.wait_until(function() return child:output():find("got b") end, 5, "the server to get b")
    H.sleep(0.3)
    assert.is_string(client:wait(a, 5))
    local c = assert(client:send("cut"))
    proxy:kill("USR1")  -- both sides see a reset
    H.sleep(0.3)
    local reply, message, kind = client:wait(c, 5)
    assert.is_nil(reply)
    assert.equal("connection", kind)
    assert.is_string(message)
    -- the next call reconnects (through the proxy, which takes new links)
    assert.is_string(client:call("after", 5))
    assert.is_nil(child:output():find("got cut"))  -- never written: no work for a failed call
    assert.is_string(client:wait(b, 5))  -- its reply was read before the loss: kept
  end)

  it("is written at once when no wait has just returned (a caller that does not wait)", function()
    local T = H.scope(finally)
    local client, b = client_with_a_reply_unread(T)
    H.sleep(0.05)  -- the last wait returned long ago: this caller is not in a send/wait ring
    assert_written_at_once(client)
    assert.is_string(client:wait(b, 5))
  end)

  it("is written at once with publisher confirms", function()
    local T = H.scope(finally)
    local client, b = client_with_a_reply_unread(T, {confirm = true})
    assert_written_at_once(client)
    assert.is_string(client:wait(b, 5))
  end)

  it("is never written once its call has ended (timed out while queued)", function()
    local T = H.scope(finally)
    local rpc = require "rpc"
    local queue = H.queue("coalesce-stale")
    local conn = assert(rpc.connect(H.opts()))
    T:defer(function() conn:close() end)
    assert(conn:declare_queue(queue, {auto_delete = true}))
    assert(conn:consume(queue, {ack = false}))
    local client = T:client(queue, {timeout = 1})
    local a, b = client:send("a"), client:send("b")
    for _ = 1, 2 do  -- a plain consumer: it answers, and would show any request that comes
      local msg = assert(conn:receive(5))
      assert(conn:publish("", msg.reply_to, "r" .. msg.body, {correlation_id = msg.correlation_id}))
    end
    H.sleep(0.3)
    assert.equal("ra", client:wait(a, 5))
    local late = assert(client:send("late"))  -- queued: b's reply is in hand
    H.sleep(1.3)  -- away from the library past the send's 1 s timeout
    assert.equal("rb", client:wait(b, 5))
    local reply, _, kind = client:wait(late)
    assert.is_nil(reply)
    assert.equal("timeout", kind)
    assert.is_true(client:flush())
    local got, _, why = conn:receive(0.5)
    assert.is_nil(got and got.body, "a request whose call had timed out reached the queue")
    assert.equal("timeout", why)
  end)

  it("is written at once when nothing waits unread", function()
    local T = H.scope(finally)
    local queue = H.queue("coalesce-none")
    T:spawn {code = CHILD_CLOCK, queue = queue}:wait_ready()
    local client = T:client(queue)
    assert_written_at_once(client)
  end)

  it("keeps a ring of 100 in flight answered, in order, with nothing discarded", function()
    local T = H.scope(finally)
    local queue = H.queue("coalesce-ring")
    T:spawn {code = CHILD_CLOCK, queue = queue}:wait_ready()
    local client = T:client(queue)
    local ring, sent, answered = {}, 0, 0
    for i = 1, 100 do
      sent = sent + 1
      ring[i] = {id = assert(client:send("r" .. sent)), n = sent}
    end
    local last = 0
    for i = 1, 5000 do
      local slot = ring[(i - 1) % 100 + 1]
      local got = tonumber(assert(client:wait(slot.id, 10)))
      assert.is_true(got >= last, "replies came out of order")
      last = got
      answered = answered + 1
      if sent < 5000 then
        sent = sent + 1
        ring[(i - 1) % 100 + 1] = {id = assert(client:send("r" .. sent)), n = sent}
      elseif answered == 5000 then
        break
      end
    end
    local stats = client:stats()
    assert.same({5000, 5000, 0}, {stats.calls, stats.replies, stats.discarded})
  end)

  it("takes no arguments in flush() and says when the client is closed", function()
    local T = H.scope(finally)
    local client = T:client(H.queue("coalesce-closed"))
    assert.is_true(client:flush())  -- nothing queued
    client:close()
    local ok, message, kind = client:flush()
    assert.is_nil(ok)
    assert.equal("closed", kind)
    assert.matches("closed", message)
    assert.matches("bad argument #1 to 'flush'", H.error_of(function() local _ = client.flush({}) end))
  end)
end)
