-- A broker user with a canary password, every failure rabbitrpc can be driven into with it, and
-- the canary looked for in everything rabbitrpc returns, raises, logs or prints.
local H = require "support.helpers"
local rpc = require "rpc"

local CANARY = "canary" .. H.hex(8)
local USER = "spec-canary-" .. H.hex(4)
local PORT = H.PORT

local function url(parts)
  parts = parts or {}
  return ("%s://%s:%s@%s:%s/%s"):format(parts.scheme or "amqp", USER, parts.password or CANARY,
                                        parts.host or "localhost", parts.port or PORT,
                                        parts.vhost or "")
end

-- Everything seen, checked at the end of each spec and as it comes.
local seen
local function saw(...)
  for i = 1, select("#", ...) do
    local v = select(i, ...)
    local s = type(v) == "table" and require("dkjson").encode(v) or tostring(v)
    seen[#seen + 1] = s
    assert(not s:find(CANARY, 1, true), ("the password shows in %q"):format(s))
  end
  return ...
end

describe("credentials", function()
  setup(function()
    local out, status = H.ctl("add_user", USER, CANARY)
    assert(status == 0, out)
    out, status = H.ctl("set_permissions", "-p", "/", USER, ".*", ".*", ".*")
    assert(status == 0, out)
  end)
  teardown(function()
    H.ctl("delete_user", USER)
    H.cleanup()
  end)
  before_each(function() seen = {} end)

  it("work: the canary user can call and serve", function()
    local T = H.scope(finally)
    local queue = H.queue("canary")
    local server = T:server(queue, function(body) return body end, {url = url()})
    local client = T:client(queue, {url = url()})
    assert.equal("hi", saw(client:call("hi", 5)))
    saw(tostring(client), tostring(server), client:stats(), server:stats())
    assert.matches(USER, tostring(client), 1, true)
  end)

  it("never show in what a failure returns: wrong password, wrong vhost, refused port, TLS, many brokers", function()
    local cases = {
      {url = url {password = CANARY .. "x"}, kind = "auth"},
      {url = url {vhost = "no-such-vhost"}, kind = "auth"},
      {url = url {port = 1}, kind = "connection"},
      {url = url {scheme = "amqps"}, kind = "tls"},   -- TLS spoken to the plain port
      {urls = {url {port = 1}, url {password = CANARY .. "y"}}, kind = "auth"},
    }
    for _, case in ipairs(cases) do
      local opts = {url = case.url, urls = case.urls, connect_timeout = 3}
      local client, message, kind = saw(rpc.client("q", opts))
      assert.is_nil(client)
      assert.equal(case.kind, kind, message)
      local server
      server, message, kind = saw(rpc.server(H.queue("canary"), function() end, opts))
      assert.is_nil(server)
      assert.equal(case.kind, kind, message)
    end
    assert.equal(5 * 2 * 3, #seen)  -- nil, message, kind of each
  end)

  it("never show in bad argument errors about urls or options", function()
    local bad = {
      {url = "amqp://" .. USER .. ":" .. CANARY .. "@localhost:notaport/"},
      {url = "amqp://" .. USER .. ":" .. CANARY .. "@localhost:5672/\0"},
      {urls = {url(), 42}},
      {url = url(), tls = {ca = "/x"}},                  -- tls needs amqps
      {url = url(), heartbeat = -1},
      {url = url(), bogus = true},
    }
    for _, opts in ipairs(bad) do
      local ok, err = pcall(rpc.client, "q", opts)
      assert.is_false(ok)
      assert.matches("bad argument", saw(err))
      ok, err = pcall(rpc.server, "q", function() end, opts)
      assert.is_false(ok)
      assert.matches("bad argument", saw(err))
    end
  end)

  it("never show in messages, log lines, stats or tostring while the broker stops and starts #slow", function()
    local T = H.scope(finally)
    local queue = H.queue("canary-restart")
    local lines = {}
    local server = T:server(queue, function(body) return body end,
                            {url = url(), log = function(line) lines[#lines + 1] = line end})
    local client = T:client(queue, {url = url()})
    assert.equal("before", client:call("before", 5))
    T:defer(function() H.ctl("start_app") end)
    local out, status = H.ctl("stop_app")
    assert(status == 0, out)
    saw(client:call("while stopped", 1))
    saw(client:call("while stopped", 1))
    saw(server:poll(0.5), tostring(server), tostring(client), server:stats(), client:stats())
    out, status = H.ctl("start_app")
    assert(status == 0, out)
    H.wait_until(function()
      server:poll(0.2)
      return saw(client:call("after", 1)) == "after"
    end, 30, "a call to succeed after start_app")
    saw(table.unpack(lines))
    assert.is_true(#lines >= 2, "the server logged losing and regaining the broker")
    client:close()
    server:close()
    saw(tostring(client), tostring(server), client:call("closed"), server:poll(0))
  end)

  it("never show in what the examples print when they fail (they read RPC_URL from the environment)", function()
    local env = {RPC_URL = url {password = CANARY .. "x"}}
    for _, script in ipairs {"examples/fib_client.lua", "examples/echo_client.lua",
                             "examples/fib_server.lua", "examples/echo_server.lua"} do
      local out, status, err = H.run(H.LUA .. " " .. H.quote(H.ROOT .. "/" .. script) .. " 5", env)
      assert.is_true(status ~= 0, script .. " should fail with a wrong password")
      saw(out, err)
      assert.matches("auth", out .. err, 1, true)
      local source = H.read_file(H.ROOT .. "/" .. script)
      assert.is_nil(source:find("arg%[%d%]%s*or%s*os%.getenv%(\"RPC_URL\"%)"),
                    script .. " must not take the url from its command line")
    end
  end)
end)
