-- Faults from the broker's side: its app stopped and started, connections closed under calls.
-- Each spec restores what it broke (start_app in finally), and kills only its own children.
local H = require "support.helpers"

-- A child server that logs to stderr, so the spec can see it reconnect.
local LOGGING_SERVER = [[
local server = assert(rpc.server(QUEUE, function(body) return "ok:" .. body end, {url = URL,
  log = function(line) io.stderr:write(line, "\n") end}))
ready()
print("run:", server:run())
]]

describe("resilience", function()
  teardown(H.cleanup)

  it("a client and a server recover when the broker's app is stopped and started #slow", function()
    local T = H.scope(finally)
    local queue = H.queue("restart")
    local server = T:spawn {code = LOGGING_SERVER, queue = queue}
    server:wait_ready()
    local client = T:client(queue)
    assert.equal("ok:before", client:call("before", 5))

    T:defer(function() H.ctl("start_app") end)  -- whatever happens below
    local out, status = H.ctl("stop_app")
    assert.equal(0, status, out)
    local elapsed, reply, message, kind = H.timed(client.call, client, "during", 5)
    assert.is_nil(reply)
    assert.equal("connection", kind, message)
    assert.is_true(elapsed < 5.5, ("took %.3f s"):format(elapsed))
    H.assert_no_password(message)

    out, status = H.ctl("start_app")
    assert.equal(0, status, out)
    local after = H.wait_until(function()
      return client:call("after", 2)
    end, 30, "a call to succeed after start_app")
    assert.equal("ok:after", after)
    assert.matches("reconnected to amqp://", server:output())
    assert.is_nil(server:status(), "the server exited: " .. server:output())
  end)
end)
