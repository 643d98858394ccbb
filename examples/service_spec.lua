-- service_spec.lua: busted specs for services of your own, against a private broker:
--   export RPC_URL=$(rabbitrpc-broker url)      # in a checkout: scripts/broker.sh url
--   rabbitrpc-broker start && busted service_spec.lua; rabbitrpc-broker stop
local rpc = require "rpc"

-- the service under test; in your project: local handler = require("myservice").handler
local function handler(body)
  if body == "" then error("empty request", 0) end
  return body:upper()
end

-- a fresh queue per test: no test takes another's requests, or a request a failed test left
local function fresh_queue()
  return ("test-%d-%d"):format(os.time(), math.random(1, 1e9))
end

describe("the upper service, served in the spec's own process", function()
  local server, client

  before_each(function()
    local queue = fresh_queue()
    server = assert(rpc.server(queue, handler, {auto_delete = true}))  -- the broker: RPC_URL
    client = assert(rpc.client(queue, {timeout = 5}))
  end)

  after_each(function()
    client:close()
    server:close()
  end)

  it("upper-cases the body", function()
    -- a waiting call serves the servers of its own Lua state: no thread, no poll() needed
    assert.equal("HELLO", client:call("hello"))
  end)

  it("answers an empty body with a remote error", function()
    local reply, message, kind = client:call("")
    assert.is_nil(reply)
    assert.equal("remote", kind)
    assert.equal("empty request", message)
  end)
end)

describe("a server run as its own program", function()
  it("echoes a request", function()
    local queue = fresh_queue()
    -- your server's script, taking the queue name as its argument; $! is its PID
    local sh = io.popen("lua5.4 examples/echo_server.lua " .. queue .. " > /dev/null 2>&1 & echo $!")
    local pid = assert(tonumber(sh:read("l")))
    sh:close()
    finally(function() os.execute("kill " .. pid) end)  -- SIGTERM: it finishes and exits
    local client <close> = assert(rpc.client(queue, {timeout = 5}))
    local reply, message, kind
    for _ = 1, 100 do  -- up to 10 s for it to declare its queue: calls before fail with no_route
      reply, message, kind = client:call("ping")
      if kind ~= "no_route" then break end
      rpc.sleep(0.1)
    end
    assert.equal("ping", reply, message)
  end)
end)
