-- The rock builds offline with luarocks and works from the tree it was installed into.
local H = require "support.helpers"

describe("luarocks make", function()
  teardown(H.cleanup)

  it("installs into a temporary tree from which require 'rpc' loads and calls #slow", function()
    local tree = os.tmpname()
    os.remove(tree)
    local T = H.scope(function() end)   -- busted keeps one finally per test: this one closes T
    finally(function()
      T:close()
      os.execute("rm -rf '" .. tree .. "' rpc csrc/*.o")  -- luarocks builds in the checkout
    end)
    local cmd = ("luarocks --lua-version=5.4 --tree '%s' make rockspec/rabbitrpc-scm-1.rockspec > '%s.log' 2>&1")
      :format(tree, tree)
    local built = os.execute(cmd)
    local log = io.open(tree .. ".log"):read("a")
    os.remove(tree .. ".log")
    assert.is_true(built, log)

    local code = [[
      local rpc = require "rpc"
      local q = "install-spec-" .. os.time()
      local s <close> = assert(rpc.server(q, function(b) return "from the tree: " .. b end, {auto_delete = true}))
      local c <close> = assert(rpc.client(q))
      print(package.searchpath("rpc.core", package.cpath))
      print(assert(c:call("ok", 5)))
    ]]
    local child = ("RPC_URL=%s LUA_PATH='%s/share/lua/5.4/?.lua' LUA_CPATH='%s/lib/lua/5.4/?.so' lua5.4 -e %s 2>&1")
      :format(H.quote(H.URL), tree, tree, H.quote(code))
    local out = io.popen(child):read("a")
    assert.matches(tree .. "/lib/lua/5.4/rpc/core.so", out, 1, true)
    assert.matches("from the tree: ok", out, 1, true)

    -- the rabbitrpc command: luarocks' wrapper in <tree>/bin, run away from the checkout
    local function installed(args)
      return ("cd /tmp && exec env -u LUA_PATH_5_4 -u LUA_CPATH_5_4 -u LUA_PATH -u LUA_CPATH '%s/bin/rabbitrpc' %s")
        :format(tree, args)
    end
    local help, status, err = H.run("sh -c " .. H.quote(installed("call --help")))
    assert.equal(0, status, help .. err)
    assert.matches("Usage: rabbitrpc call", help, 1, true)
    local queue = H.queue("install-cli")
    local server = T:spawn {sh = installed("serve " .. queue .. " --echo")}
    server:wait_output("rabbitrpc: serving")
    local reply
    reply, status, err = H.run("sh -c " .. H.quote(installed("call " .. queue .. " 'from the tree'")))
    assert.equal(0, status, reply .. err)
    assert.equal("from the tree\n", reply)
    server:kill("TERM")
    assert.equal(0, server:wait(5), server:output())
  end)
end)
