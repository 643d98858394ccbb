-- Runtime failures come back as nil, message, kind: connection, auth, closed, remote, broker.
local H = require "support.helpers"
local rpc = require "rpc"

local WRONG_PASSWORD = "s3cr3t-Wr0ng-" .. H.hex(4)

--- Checks a failed constructor result: nil, a message for people without the password, kind.
local function assert_failure(expected_kind, object, message, kind, password)
  if object then object:close() end
  assert.is_nil(object, "it succeeded")
  assert.equal(expected_kind, kind, message)
  assert.is_string(message)
  assert.is_true(#message > 0)
  if password then
    assert.is_nil(message:find(password, 1, true), "the password shows in: " .. message)
  end
end

describe("errors", function()
  teardown(H.cleanup)

  describe("'connection'", function()
    it("comes from rpc.client at once when nothing listens on the port", function()
      local url = H.url_with {host = "127.0.0.1", port = 1, password = WRONG_PASSWORD}
      local elapsed, client, message, kind = H.timed(rpc.client, "q", {url = url})
      assert_failure("connection", client, message, kind, WRONG_PASSWORD)
      assert.is_true(elapsed < 2, ("took %.3f s"):format(elapsed))
    end)

    it("comes from rpc.server at once when nothing listens on the port", function()
      local url = H.url_with {host = "127.0.0.1", port = 1}
      local elapsed, server, message, kind = H.timed(rpc.server, "q", function(b) return b end, {url = url})
      assert_failure("connection", server, message, kind)
      assert.is_true(elapsed < 2, ("took %.3f s"):format(elapsed))
    end)

    it("comes quickly for a host name that does not resolve", function()
      local url = H.url_with {host = "no-such-host.invalid", password = WRONG_PASSWORD}
      local elapsed, client, message, kind = H.timed(rpc.client, "q", {url = url})
      assert_failure("connection", client, message, kind, WRONG_PASSWORD)
      assert.is_true(elapsed < 5, ("took %.3f s"):format(elapsed))
    end)

    it("comes within connect_timeout from an address that never answers", function()
      local url = H.url_with {host = "10.255.255.1", port = 5672}  -- nothing there; may drop SYNs
      local elapsed, client, message, kind = H.timed(rpc.client, "q", {url = url, connect_timeout = 0.5})
      assert_failure("connection", client, message, kind)
      assert.is_true(elapsed < 0.5 + 1, ("took %.3f s with connect_timeout 0.5"):format(elapsed))
    end)

    it("ends a call in progress when the broker closes the connection #slow", function()
      local T = H.scope(finally)
      local queue = H.queue("lost")
      assert.is_true(H.amqp1({op = "declare", queue = queue}).ok)   -- nobody will answer
      local before = H.broker_ports()
      local client = T:client(queue)
      local mine = H.new_ports(before, H.broker_ports())
      assert.equal(1, #mine, "expected one new connection to the broker")
      local pid = H.wait_until(function()
        local _, pids = H.broker_connections()
        return pids[mine[1]]
      end, 20, "the broker to list the client's connection")
      T:spawn {sh = ("sleep 0.5; %s ctl close_connection %s %s"):format(
        H.quote(H.BROKER), H.quote(pid), H.quote("spec: closing the connection"))}
      local elapsed, reply, message, kind = H.timed(client.call, client, "anyone?", 30)
      assert.is_nil(reply)
      assert.equal("connection", kind, message)
      assert.is_string(message)
      assert.is_true(elapsed < 20, ("the call noticed after %.1f s"):format(elapsed))
      T:server(queue, function(body) return "back:" .. body end)
      assert.equal("back:next", client:call("next", 5))  -- the next call reconnects
    end)
  end)

  describe("'auth'", function()
    it("comes from rpc.client for a wrong password, and the message does not show it", function()
      local url = H.url_with {password = WRONG_PASSWORD}
      local elapsed, client, message, kind = H.timed(rpc.client, "q", {url = url, connect_timeout = 5})
      assert_failure("auth", client, message, kind, WRONG_PASSWORD)
      assert.is_true(elapsed < 5, ("took %.3f s"):format(elapsed))
    end)

    it("comes from rpc.server for a wrong password, and the message does not show it", function()
      local url = H.url_with {password = WRONG_PASSWORD}
      local server, message, kind = rpc.server("q", function(b) return b end, {url = url, connect_timeout = 5})
      assert_failure("auth", server, message, kind, WRONG_PASSWORD)
    end)

    it("comes for a vhost that does not exist", function()
      local url = H.url_with {vhost = "spec-no-such-vhost-" .. H.hex(4)}
      local client, message, kind = rpc.client("q", {url = url, connect_timeout = 5})
      assert_failure("auth", client, message, kind)
      local server, message2, kind2 = rpc.server("q", function(b) return b end, {url = url, connect_timeout = 5})
      assert_failure("auth", server, message2, kind2)
    end)
  end)

  describe("'closed'", function()
    it("comes from call on a closed client", function()
      local T = H.scope(finally)
      local queue = H.queue("closed")
      T:server(queue, function(body) return body end)
      local client = T:client(queue)
      assert.equal("open", client:call("open", 5))
      client:close()
      local reply, message, kind = client:call("x", 5)
      assert.is_nil(reply)
      assert.equal("closed", kind)
      assert.matches("closed", message)
      reply, message, kind = client:call("again")  -- still closed, no reconnect
      assert.is_nil(reply)
      assert.equal("closed", kind)
    end)

    it("comes from poll and run on a closed server", function()
      local T = H.scope(finally)
      local server = T:server(H.queue("closed"), function(body) return body end)
      server:close()
      for _, method in ipairs {"poll", "run"} do
        local ok, message, kind = server[method](server)
        assert.is_nil(ok, method)
        assert.equal("closed", kind, method)
        assert.matches("closed", message)
      end
    end)
  end)

  describe("'remote'", function()
    it("comes when the server's handler raises, with its text", function()
      local T = H.scope(finally)
      local queue = H.queue("remote")
      T:server(queue, function(body) error("cannot handle " .. body) end)
      local reply, message, kind = T:client(queue):call("this", 5)
      assert.is_nil(reply)
      assert.equal("remote", kind)
      assert.matches("cannot handle this", message, 1, true)
    end)

    it("comes from a server in another process", function()
      local T = H.scope(finally)
      local queue = H.queue("remote-child")
      T:spawn {queue = queue, code = [[
        local server = assert(rpc.server(QUEUE, function(body) error("child says no to " .. body) end, {url = URL}))
        ready()
        server:run()
      ]]}:wait_ready()
      local reply, message, kind = T:client(queue):call("that", 5)
      assert.is_nil(reply)
      assert.equal("remote", kind)
      assert.matches("child says no to that", message, 1, true)
    end)
  end)

  describe("'broker'", function()
    it("comes from rpc.server when the queue exists with other flags", function()
      local queue = H.queue("inequivalent")
      assert.is_true(H.amqp1({op = "declare", queue = queue, durable = true}).ok)
      local server, message, kind = rpc.server(queue, function(b) return b end, H.opts())
      assert_failure("broker", server, message, kind)
    end)
  end)
end)
