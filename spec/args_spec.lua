-- Programming errors raise "bad argument ..." (luaL_argerror wording); nothing is acquired.
-- Every call under test is made as a statement, never `return f(...)`: a tail call would lose
-- the function name that luaL_argerror reports.
local H = require "support.helpers"
local rpc = require "rpc"

local NOWHERE = H.url_with {host = "127.0.0.1", port = 1}  -- if a check is missing: 'connection'

local function handler(body) return body end

--- Asserts that fn raises "bad argument #n to 'name'", mentioning each extra plain text.
local function assert_bad(n, name, fn, ...)
  local err = H.error_of(fn)
  assert.matches("bad argument #" .. n .. " to '" .. name .. "'", err, 1, true)
  for _, text in ipairs {...} do assert.matches(text, err, 1, true) end
  return err
end

describe("bad arguments", function()
  teardown(H.cleanup)

  describe("to client:call", function()
    local client
    setup(function()
      -- its queue is bound to nothing: a call whose arguments pass fails fast with no_route
      client = assert(rpc.client(H.queue("args"), H.opts()))
    end)
    teardown(function() if client then client:close() end end)

    it("raise for a body that is not a string or number, with Lua's wording", function()
      local err = H.error_of(function() client:call({}) end)
      assert.matches("bad argument #1 to 'call' (string expected, got table)", err, 1, true)
      assert_bad(1, "call", function() client:call(nil) end, "string expected, got nil")
      assert_bad(1, "call", function() client:call() end, "string expected, got no value")
      assert_bad(1, "call", function() client:call(true) end, "string expected, got boolean")
      assert_bad(1, "call", function() client:call(print) end, "string expected, got function")
    end)

    it("raise for a timeout that is not a positive finite number", function()
      for _, timeout in ipairs {0, -1, 0/0, math.huge, -math.huge} do
        assert_bad(2, "call", function() client:call("x", timeout) end)
      end
      assert_bad(2, "call", function() client:call("x", "x") end, "number expected, got string")
      assert_bad(2, "call", function() client:call("x", {}) end, "number expected, got table")
    end)

    it("raise for callopts that is not a table", function()
      assert_bad(3, "call", function() client:call("x", 5, "opts") end)
      assert_bad(3, "call", function() client:call("x", 5, true) end)
    end)

    it("raise for an unknown callopts key, naming it", function()
      assert_bad(3, "call", function() client:call("x", 5, {colour = "red"}) end, "colour")
      assert_bad(3, "call", function() client:call("x", 5, {timeout = 1}) end, "timeout")
      assert_bad(3, "call", function() client:call("x", 5, {[1] = "x"}) end)
    end)

    it("raise for callopts values of the wrong type or range", function()
      for _, opts in ipairs {
        {content_type = {}},
        {content_type = true},
        {headers = "tenant=acme"},
        {headers = true},
        {persistent = "yes"},
        {persistent = 1},
        {priority = 300},
        {priority = 256},
        {priority = -1},
        {priority = 1.5},
        {priority = true},
        {exchange = {}},
        {exchange = false},
        {routing_key = {}},
        {routing_key = true},
      } do
        local key = next(opts)
        assert_bad(3, "call", function() client:call("x", 5, opts) end, key)
      end
    end)

    it("raise for headers with a key that is not a string or a value of another type", function()
      for _, headers in ipairs {
        {[1] = "x"},
        {[true] = "x"},
        {nested = {}},
        {fn = print},
        {co = coroutine.create(print)},
      } do
        assert_bad(3, "call", function() client:call("x", 5, {headers = headers}) end)
      end
    end)

    it("accept valid arguments (the call then fails with 'no_route', not an error)", function()
      for _, args in ipairs {
        {"x"},
        {"x", nil},
        {"x", 5},
        {"x", nil, {}},
        {"x", 0.5, {content_type = "text/plain", persistent = false, priority = 0}},
        {"x", 5, {priority = 255, headers = {}}},
        {42, 5, {headers = {s = "v", i = 1, f = 0.5, b = true}}},
      } do
        local reply, message, kind = client:call(table.unpack(args, 1, 3))
        assert.is_nil(reply)
        assert.equal("no_route", kind, message)
      end
    end)
  end)

  describe("to rpc.client", function()
    it("raise for a queue that is not a string", function()
      assert_bad(1, "client", function() rpc.client({}, {url = NOWHERE}) end)
      assert_bad(1, "client", function() rpc.client(nil, {url = NOWHERE}) end)
      assert_bad(1, "client", function() rpc.client() end)
      assert_bad(1, "client", function() rpc.client(true, {url = NOWHERE}) end)
    end)

    it("raise for opts that is not a table", function()
      assert_bad(2, "client", function() rpc.client("q", "opts") end)
      assert_bad(2, "client", function() rpc.client("q", 5) end)
    end)

    it("raise for an unknown option, naming it", function()
      assert_bad(2, "client", function() rpc.client("q", {url = NOWHERE, colour = "red"}) end, "colour")
      assert_bad(2, "client", function() rpc.client("q", {url = NOWHERE, prefetch = 1}) end, "prefetch")
      assert_bad(2, "client", function() rpc.client("q", {url = NOWHERE, durable = true}) end, "durable")
      assert_bad(2, "client", function() rpc.client("q", {url = NOWHERE, [1] = true}) end)
    end)

    it("raise for option values of the wrong type or range", function()
      for _, opts in ipairs {
        {heartbeat = -1},
        {heartbeat = true},
        {heartbeat = {}},
        {connect_timeout = 0},
        {connect_timeout = -1},
        {connect_timeout = 0/0},
        {connect_timeout = "soon"},
        {timeout = 0},
        {timeout = -5},
        {timeout = 0/0},
        {timeout = math.huge},
        {timeout = {}},
        {reply_to = 5},
        {reply_to = true},
        {reply_to = {}},
      } do
        local key = next(opts)
        opts.url = NOWHERE
        assert_bad(2, "client", function() rpc.client("q", opts) end, key)
      end
    end)

    it("raise for a url that is not a string or not an amqp url", function()
      assert_bad(2, "client", function() rpc.client("q", {url = 5}) end, "url")
      assert_bad(2, "client", function() rpc.client("q", {url = {}}) end, "url")
      assert_bad(2, "client", function() rpc.client("q", {url = "not a url"}) end)
      assert_bad(2, "client", function() rpc.client("q", {url = "http://127.0.0.1:1/"}) end)
    end)
  end)

  describe("to rpc.server", function()
    it("raise for a queue that is not a string", function()
      assert_bad(1, "server", function() rpc.server({}, handler, {url = NOWHERE}) end)
      assert_bad(1, "server", function() rpc.server(nil, handler, {url = NOWHERE}) end)
    end)

    it("raise for a handler that is not a function", function()
      assert_bad(2, "server", function() rpc.server("q", "handler", {url = NOWHERE}) end)
      assert_bad(2, "server", function() rpc.server("q", nil, {url = NOWHERE}) end)
      assert_bad(2, "server", function() rpc.server("q") end)
      assert_bad(2, "server", function() rpc.server("q", {}, {url = NOWHERE}) end)
    end)

    it("raise for opts that is not a table", function()
      assert_bad(3, "server", function() rpc.server("q", handler, "opts") end)
    end)

    it("raise for an unknown option, naming it", function()
      assert_bad(3, "server", function() rpc.server("q", handler, {url = NOWHERE, colour = 1}) end, "colour")
      assert_bad(3, "server", function() rpc.server("q", handler, {url = NOWHERE, timeout = 5}) end, "timeout")
      assert_bad(3, "server", function() rpc.server("q", handler, {url = NOWHERE, reply_to = "direct"}) end,
        "reply_to")
    end)

    it("raise for option values of the wrong type or range", function()
      for _, opts in ipairs {
        {prefetch = 0},
        {prefetch = -1},
        {prefetch = 1.5},
        {prefetch = "many"},
        {durable = "yes"},
        {durable = 1},
        {exclusive = 1},
        {auto_delete = "no"},
        {arguments = "x-queue-type=classic"},
        {arguments = true},
        {heartbeat = -1},
        {connect_timeout = 0},
        {url = 5},
      } do
        local key = next(opts)
        if key ~= "url" then opts.url = NOWHERE end
        assert_bad(3, "server", function() rpc.server("q", handler, opts) end, key)
      end
    end)

    it("raise for queue arguments that cannot go into an AMQP table", function()
      for _, arguments in ipairs {
        {["x-max-length"] = {}},
        {["x-max-length"] = print},
        {[1] = "x"},
      } do
        assert_bad(3, "server", function() rpc.server("q", handler, {url = NOWHERE, arguments = arguments}) end)
      end
    end)
  end)

  describe("to rpc.serve", function()
    it("raise like rpc.server's, named 'serve'", function()
      assert_bad(1, "serve", function() rpc.serve({}, handler, {url = NOWHERE}) end)
      assert_bad(2, "serve", function() rpc.serve("q", 5, {url = NOWHERE}) end)
      assert_bad(3, "serve", function() rpc.serve("q", handler, {url = NOWHERE, colour = 1}) end, "colour")
      assert_bad(3, "serve", function() rpc.serve("q", handler, {url = NOWHERE, prefetch = 0}) end, "prefetch")
    end)
  end)

  describe("to server:poll", function()
    it("raise for a timeout that is not a number of seconds >= 0", function()
      local T = H.scope(finally)
      local server = T:server(H.queue("poll-args"), handler)
      assert_bad(1, "poll", function() server:poll(-1) end)
      assert_bad(1, "poll", function() server:poll(0/0) end)
      assert_bad(1, "poll", function() server:poll("soon") end)
      assert.equal(0, server:poll(0))
    end)
  end)
end)
