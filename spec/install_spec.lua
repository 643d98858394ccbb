-- The rock builds offline with luarocks and works from the tree it was installed into.
local H = require "support.helpers"

describe("luarocks make", function()
  it("installs into a temporary tree from which require 'rpc' loads and calls #slow", function()
    local tree = os.tmpname()
    os.remove(tree)
    finally(function()
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
  end)
end)
