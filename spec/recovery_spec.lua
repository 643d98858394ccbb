-- Recovering from a lost connection on the first attempt: a client whose broker's app stopped
-- (urls: through the other node at once), a client the broker dropped while it idled or closed
-- by rabbitmqctl, rpc.connect connections that hold nothing a reconnect loses (transparent) or
-- hold a consumer (the loss reported once), and delivery tags from before a reconnect (stale).
-- Every call whose success is the promise is asserted on its first attempt, never retried.
local H = require "support.helpers"
local rpc = require "rpc"

--- Asserts success (a first value that is not nil) and returns every value; on nil, message,
-- kind fails showing them.
local function ok(...)
  local v, message, kind = ...
  if v == nil then
    error(("expected success, got nil, %s, %s"):format(tostring(message), tostring(kind)), 2)
  end
  return ...
end

--- Asserts nil, message, kind with that kind; returns the message.
local function fails(kind, v, message, got)
  if v ~= nil then
    error(("expected nil, message, %q; got %s, %s, %s"):format(kind, tostring(v), tostring(message),
                                                              tostring(got)), 2)
  end
  assert.equal(kind, got, message)
  assert.is_string(message)
  H.assert_no_password(message)
  return message
end

--- A connection closed at the end of the test.
local function connect(T, opts)
  local conn, message, kind = rpc.connect(H.opts(opts))
  if not conn then error(("rpc.connect failed: %s (%s)"):format(message, kind), 2) end
  T:defer(function() conn:close() end)
  return conn
end

--- Ready messages in queue, on the spec broker (a passive declare through pika).
local function count(queue)
  local r = H.amqp1 {op = "count", queue = queue}
  assert(r.ok, "counting " .. queue .. ": " .. tostring(r.text))
  return r.messages
end

--- Waits until queue holds n ready messages (unacked ones go back when their channel closes).
local function wait_count(queue, n)
  local last
  H.wait_until(function()
    last = count(queue)
    return last == n
  end, 5, ("%d ready messages in %s"):format(n, queue))
end

--- Runs fn() (which opens one connection to the spec broker) and returns its result and the
-- local port of that connection.
local function with_port(fn)
  local before = H.broker_ports()
  local v = fn()
  local mine = H.new_ports(before, H.broker_ports())
  assert.equal(1, #mine, "expected one new connection to the broker")
  return v, mine[1]
end

--- The Erlang pid of the broker's connection from local port (what close_connection takes).
local function broker_pid(port)
  return H.wait_until(function()
    local _, pids = H.broker_connections()
    return pids[port]
  end, 10, "the broker to list the connection from port " .. port)
end

--- The state of this end of the connection from local port to the broker: whether it is
-- still established (the broker has not closed the socket) and the bytes unread in it.
local function socket(port)
  for _, file in ipairs {"/proc/net/tcp", "/proc/net/tcp6"} do
    for line in (H.read_file(file) or ""):gmatch("[^\n]+") do
      local lport, rport, state, rx = line:match("^%s*%d+:%s+%x+:(%x+)%s+%x+:(%x+)%s+(%x+)%s+%x+:(%x+)")
      if lport and tonumber(lport, 16) == port and tonumber(rport, 16) == H.PORT then
        return state == "01", tonumber(rx, 16)
      end
    end
  end
  return false, 0
end

--- Whether the broker has closed the socket of the connection from local port (missed
-- heartbeats: it just closes it).
local function dropped(port)
  return not socket(port)
end

--- Whether the broker has begun closing the connection from local port: unread input (its
-- connection.close, with no heartbeat due for a minute) or a closed socket.
local function closing(port)
  local established, unread = socket(port)
  return not established or unread > 0
end

--- Closes a connection from the broker's side (rabbitmqctl close_connection) and waits until
-- the broker's close has reached this end, unread.
local function close_connection(pid, port)
  local out, status = H.ctl("close_connection", pid, "spec: closed by the broker")
  assert.equal(0, status, out)
  H.wait_until(function() return closing(port) end, 10,
               "the broker to close the connection from port " .. port)
end

-- A server in a child process, on env SPEC_URLS (space separated) or URL.
local SERVER = [[
local urls = {}
for url in (os.getenv("SPEC_URLS") or URL):gmatch("%S+") do urls[#urls + 1] = url end
local server = assert(rpc.server(QUEUE, function(body) return "ok:" .. body end,
  {urls = urls, log = function(line) io.stderr:write(line, "\n") end}))
ready()
server:run()
]]

-- ---- extra broker nodes ----

--- Runs one shell command per node at the same time (each with its node's settings); returns
-- the output and whether every one succeeded.
local function on_nodes(nodes, command)
  local parts = {}
  for i, node in ipairs(nodes) do
    parts[i] = ("RPC_BROKER_PORT=%d RPC_BROKER_DIR=%s %s %s & p%d=$!")
      :format(node.port, H.quote(node.dir), H.quote(H.BROKER), command, i)
  end
  local script = table.concat(parts, "; ") .. "; s=0"
  for i = 1, #nodes do script = script .. ("; wait $p%d || s=1"):format(i) end
  local out, status, err = H.run("sh -c " .. H.quote(script .. "; exit $s"))
  return out .. err, status == 0
end

--- Starts a private node on each port (in parallel), stopped at the end of the test.
local function start_nodes(T, ports)
  local nodes = {}
  for i, port in ipairs(ports) do
    nodes[i] = {port = port, dir = H.tmpdir() .. "/recovery-node-" .. port,
                url = H.url_with {port = port}}
  end
  T:defer(function() on_nodes(nodes, "stop") end)
  local out, started = on_nodes(nodes, "start")
  assert(started, "starting the nodes failed: " .. out)
  return nodes
end

--- rabbitmqctl against one of start_nodes' nodes; asserts it succeeded.
local function node_ctl(node, ...)
  local words = {}
  for i, a in ipairs {...} do words[i] = H.quote(a) end
  local out, status, err = H.run(H.quote(H.BROKER) .. " ctl " .. table.concat(words, " "),
                                 {RPC_BROKER_PORT = tostring(node.port), RPC_BROKER_DIR = node.dir})
  assert.equal(0, status, out .. err)
end

--- Declares queue on the node (a plain queue, as a server declares it).
local function declare_on(node, queue)
  local conn = ok(rpc.connect {url = node.url})
  local declared, message, kind = conn:declare_queue(queue)
  conn:close()
  ok(declared, message, kind)
end

describe("recovery", function()
  teardown(H.cleanup)

  it("a client given urls gets its first call after its node's app stopped answered through the other node, round after round #slow", function()
    local T = H.scope(finally)
    local nodes = start_nodes(T, {H.PORT + 12, H.PORT + 13})
    local queue = H.queue("failover-now")
    for _, node in ipairs(nodes) do declare_on(node, queue) end
    local urls = {nodes[1].url, nodes[2].url}
    local server = T:spawn {code = SERVER, queue = queue, env = {SPEC_URLS = table.concat(urls, " ")}}
    server:wait_ready()
    local client = T:client(queue, {urls = urls})
    assert.equal("ok:first", client:call("first", 5))
    assert.matches(":" .. nodes[1].port .. "/", tostring(client), 1, true)
    local on = 1
    for round = 1, 4 do
      local other = 3 - on
      node_ctl(nodes[on], "stop_app")
      local body = ("round %d: %d stopped"):format(round, nodes[on].port)
      local elapsed, reply, message, kind = H.timed(client.call, client, body, 5)  -- the first attempt
      assert.equal("ok:" .. body, reply, ("%s: %s (%s) after %.3f s; the server said:\n%s")
        :format(body, tostring(message), tostring(kind), elapsed, server:output()))
      assert.matches(":" .. nodes[other].port .. "/", tostring(client), 1, true)
      node_ctl(nodes[on], "start_app")
      declare_on(nodes[on], queue)  -- its plain queues did not survive the restart
      on = other
    end
    assert.is_nil(server:status(), "the server exited: " .. server:output())
  end)

  it("a client gets its next call answered after the broker closed its connection, whether it idled past its heartbeats or called under a second before #slow", function()
    local T = H.scope(finally)
    local queue = H.queue("closed")
    T:spawn({code = SERVER, queue = queue}):wait_ready()
    local client, port = with_port(function() return T:client(queue, {heartbeat = 1}) end)
    assert.equal("ok:before", client:call("before", 5))
    -- idle, sending no heartbeats: the broker drops it after about two
    H.wait_until(function() return dropped(port) end, 10, "the broker to drop the idle client's connection")
    local elapsed, reply, message, kind = H.timed(client.call, client, "after idling", 5)  -- the first attempt
    assert.equal("ok:after idling", reply, ("%s (%s) after %.3f s"):format(tostring(message), tostring(kind), elapsed))
    client:close()

    local busy  -- heartbeats every minute: unread input is the broker's connection.close
    busy, port = with_port(function() return T:client(queue) end)
    -- rabbitmqctl takes about 0.4 s to start: the call is over long before the close comes
    local closer = T:spawn {sh = ("%s ctl close_connection %s %s"):format(
      H.quote(H.BROKER), H.quote(broker_pid(port)), H.quote("spec: closed by the broker"))}
    assert.equal("ok:busy", busy:call("busy", 5))
    local t0 = H.now()  -- the client's last read: well under a second before the next call
    H.wait_until(function() return closing(port) end, 10, "the broker to close the busy client's connection")
    local since = H.now() - t0
    assert.equal(0, closer:wait(10), closer:output())
    elapsed, reply, message, kind = H.timed(busy.call, busy, "after the close", 5)  -- the first attempt
    assert.equal("ok:after the close", reply, ("%s (%s) after %.3f s, %.3f s after the last call")
      :format(tostring(message), tostring(kind), elapsed, since))
  end)

  describe("rpc.connect", function()
    it("a connection that holds nothing a reconnect would lose reconnects transparently after the broker closed it", function()
      local T = H.scope(finally)
      local queue = H.queue("transparent")
      assert.is_true(H.amqp1({op = "declare", queue = queue}).ok)
      local conn, port = with_port(function() return connect(T) end)
      assert.is_true(ok(conn:publish("", queue, "one")))
      close_connection(broker_pid(port), port)
      assert.is_true(ok(conn:publish("", queue, "two")))  -- the first attempt
      wait_count(queue, 2)
      assert.same({"one", "two"}, {H.amqp1({op = "get", queue = queue, timeout = 1}).body,
                                   H.amqp1({op = "get", queue = queue, timeout = 1}).body})
    end)

    it("a connection that holds nothing a reconnect would lose publishes at once after idling past its heartbeat #slow", function()
      local T = H.scope(finally)
      local queue = H.queue("transparent-idle")
      assert.is_true(H.amqp1({op = "declare", queue = queue}).ok)
      local conn, port = with_port(function() return connect(T, {heartbeat = 1}) end)
      assert.is_true(ok(conn:publish("", queue, "one")))
      H.wait_until(function() return dropped(port) end, 10, "the broker to drop the idle connection")
      local elapsed, sent, message, kind = H.timed(conn.publish, conn, "", queue, "two")  -- the first attempt
      ok(sent, message, kind)
      assert.is_true(elapsed < 1, ("took %.3f s"):format(elapsed))
      wait_count(queue, 2)
    end)

    it("a connection with a consumer reports a loss once, by the next operation, and the one after reconnects", function()
      local T = H.scope(finally)
      local queue = H.queue("consumer-lost")
      assert.is_true(H.amqp1({op = "declare", queue = queue}).ok)
      local conn, port = with_port(function() return connect(T) end)
      ok(conn:consume(queue))
      close_connection(broker_pid(port), port)
      local message = fails("connection", conn:publish("", queue, "lost with the loss"))
      H.assert_no_password(message)
      assert.is_true(ok(conn:publish("", queue, "after")))
      ok(conn:consume(queue))
      assert.equal("after", ok(conn:receive(5)).body)
    end)

    it("a delivery tag from before a reconnect is stale: ack, nack and reject say so and touch nothing", function()
      local T = H.scope(finally)
      local queue = H.queue("stale-tag")
      assert.is_true(H.amqp1({op = "declare", queue = queue}).ok)
      local conn, port = with_port(function() return connect(T) end)
      assert.is_true(ok(conn:publish("", queue, "A")))
      ok(conn:consume(queue))  -- manual acks
      local m1 = ok(conn:receive(5))
      assert.equal("A", m1.body)
      close_connection(broker_pid(port), port)
      fails("connection", conn:consume(queue))  -- the loss, reported once
      ok(conn:consume(queue))
      assert.is_true(ok(conn:publish("", queue, "B")))
      local got = {}
      for _ = 1, 2 do
        local msg = ok(conn:receive(5))
        got[msg.body] = msg
      end
      assert.is_truthy(got.A, "A was not redelivered")
      assert.is_truthy(got.B, "B did not come")
      assert.is_true(got.A.redelivered)
      fails("stale", conn:ack(m1.delivery_tag))
      fails("stale", conn:nack(m1.delivery_tag, false, false))
      fails("stale", conn:reject(m1.delivery_tag, false))
      fails("stale", conn:nack(m1.delivery_tag, true, false))
      fails("stale", conn:ack(m1.delivery_tag, true))
      conn:close()
      wait_count(queue, 2)  -- A and B are both back: nothing was acked, nacked or rejected
    end)
  end)

  it("a call after an idle spell on a peer gone silent ends within its timeout, not in a publish that waits forever (rmqc#780) #slow", function()
    local T = H.scope(finally)
    local proxy, port = T:proxy()
    local queue = H.queue("silent")
    T:server(queue, function(body) return body end)
    local client = T:client(queue, {url = H.url_with {port = port}, heartbeat = 1})
    assert.equal("before", client:call("before", 5))
    proxy:kill("STOP")  -- the peer stays connected but says nothing: no heartbeats
    T:defer(function() proxy:kill("CONT") end)
    H.sleep(3)          -- past two heartbeats without a byte
    local elapsed, reply, message, kind = H.timed(client.call, client, "during", 2)
    assert.is_nil(reply)
    assert.equal("connection", kind, message)
    assert.is_true(elapsed < 2 + 1, ("took %.3f s with a 2 s timeout"):format(elapsed))
  end)
end)
