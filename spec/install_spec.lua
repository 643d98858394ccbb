-- The rock builds offline with luarocks and works from the tree it was installed into: once with
-- Debian's lua-argparse standing in for the declared argparse (what a Debian user does), once
-- in a tree of its own where luarocks installs argparse because the rock declares it.
local H = require "support.helpers"

local LUAROCKS = "luarocks --lua-version=5.4"
-- Debian's argparse, the one luarocks installs into the private tree below (from a local rocks
-- server, as a rock of its own: luarocks.org is out of reach)
local ARGPARSE_LUA = "/usr/share/lua/5.4/argparse.lua"

--- Runs a shell command line in the checkout; fails the test with its output when it fails.
local function sh(cmd)
  local out, status, err = H.run("sh -c " .. H.quote("exec 2>&1; " .. cmd))
  assert(status == 0, ("failed (%d): %s\n%s%s"):format(status, cmd, out, err))
  return out
end

describe("luarocks make", function()
  teardown(H.cleanup)

  it("installs into a temporary tree from which require 'rpc' loads and calls #slow", function()
    local tree = os.tmpname()
    os.remove(tree)
    local T = H.scope(function() end)   -- busted keeps one finally per test: this one closes T
    finally(function()
      T:close()
      os.execute("rm -rf '" .. tree .. "' '" .. tree .. ".lua' rpc csrc/*.o")  -- luarocks builds in the checkout
    end)
    -- LuaRocks does not see Debian's packages: it is told that the system provides argparse
    -- (README: `luarocks config rocks_provided.argparse ...`; here a config of its own)
    local version = assert(H.read_file(ARGPARSE_LUA):match('argparse.version = "([%d.]+)"'))
    H.write_file(tree .. ".lua", ('rocks_provided = { argparse = "%s-1" }\n'):format(version))
    local cmd = ("LUAROCKS_CONFIG='%s.lua' %s --tree '%s' make rockspec/rabbitrpc-scm-1.rockspec > '%s.log' 2>&1")
      :format(tree, LUAROCKS, tree, tree)
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

describe("the 0.1.0 rock in a tree of its own #slow", function()
  local dir, tree, env
  lazy_setup(function()
    dir = assert(io.popen("mktemp -d /tmp/rabbitrpc-rock.XXXXXX")):read("l")
    tree = dir .. "/tree"
    -- a local rocks server holding argparse, packed from Debian's argparse.lua
    local version = assert(H.read_file(ARGPARSE_LUA):match('argparse.version = "([%d.]+)"'))
    sh(("mkdir -p %s/argparse %s/server && cp %s %s/argparse/"):format(dir, dir, ARGPARSE_LUA, dir))
    local rockspec = ("%s/argparse/argparse-%s-1.rockspec"):format(dir, version)
    H.write_file(rockspec, ([[
package = "argparse"
version = "%s-1"
source = { url = "file://%s/argparse/argparse.lua" }
dependencies = { "lua >= 5.1" }
build = { type = "builtin", modules = { argparse = "argparse.lua" } }
]]):format(version, dir))
    sh(("cd %s/server && %s pack %s && luarocks-admin --lua-version=5.4 make-manifest . > /dev/null")
      :format(dir, LUAROCKS, H.quote(rockspec)))
    sh(("%s --tree %s --only-server=%s/server make rockspec/rabbitrpc-0.1.0-1.rockspec > %s/make.log || { cat %s/make.log; exit 1; }")
      :format(LUAROCKS, H.quote(tree), H.quote(dir), H.quote(dir), H.quote(dir)))
    -- the tree only: neither Debian's Lua modules (argparse, luasystem) nor luarocks.loader
    env = {LUA_PATH_5_4 = ("%s/share/lua/5.4/?.lua;%s/share/lua/5.4/?/init.lua"):format(tree, tree),
           LUA_CPATH_5_4 = tree .. "/lib/lua/5.4/?.so"}
  end)
  lazy_teardown(function()
    if dir then os.execute("rm -rf " .. H.quote(dir)) end
    os.execute("rm -rf rpc csrc/*.o")
    H.cleanup()
  end)

  --- Runs a command of the tree's bin/ from dir (away from the checkout), with the tree-only
  -- paths and more (a table): stdout, status, stderr. RPC_BROKER_PORT is unset unless given.
  local function installed(command, args, more)
    local all = {}
    for k, v in pairs(env) do all[k] = v end
    for k, v in pairs(more or {}) do all[k] = v end
    local unset = all.RPC_BROKER_PORT and "" or "-u RPC_BROKER_PORT "
    return H.run(("sh -c %s"):format(H.quote(("cd %s && exec env %s%s/bin/%s %s")
      :format(H.quote(dir), unset, H.quote(tree), command, args))), all)
  end

  it("got argparse from the rock's declared dependency, and nothing from Debian's paths", function()
    local out = sh(("%s --tree %s list --porcelain"):format(LUAROCKS, H.quote(tree)))
    assert.matches("argparse\t[%d.]+%-1\tinstalled", out)
    assert.matches("rabbitrpc\t0.1.0%-1\tinstalled", out)
    local paths = H.run_lua([[
      print(package.searchpath("argparse", package.path))
      print(pcall(require, "system"))
    ]], env)
    assert.matches(tree .. "/share/lua/5.4/argparse.lua", paths, 1, true)
    assert.matches("false\tmodule 'system' not found", paths, 1, true)
  end)

  it("runs rabbitrpc --help and --version", function()
    local out, status, err = installed("rabbitrpc", "--help")
    assert.equal(0, status, out .. err)
    assert.matches("Usage: rabbitrpc", out, 1, true)
    out, status, err = installed("rabbitrpc", "--version")
    assert.equal(0, status, out .. err)
    assert.equal("rabbitrpc 0.1.0\n", out)
  end)

  it("serves and calls, and makes --repeat 5 calls without luasystem", function()
    local T = H.scope(finally)
    local queue = H.queue("rock-cli")
    local server = T:spawn {sh = ("exec %s/bin/rabbitrpc serve %s --echo -v"):format(H.quote(tree), queue), env = env}
    server:wait_output("rabbitrpc: serving")
    local out, status, err = installed("rabbitrpc", "call " .. queue .. " 'from its own tree'")
    assert.equal(0, status, out .. err)
    assert.equal("from its own tree\n", out)
    out, status, err = installed("rabbitrpc", "call " .. queue .. " x --repeat 5 --parallel 2")
    assert.equal(0, status, out .. err)
    assert.matches("calls: 5\nok: 5\nfailed: 0\n", out, 1, true)
    assert.matches("latency: min [%d.]+ p50", out)
    -- -v's lines: whole-second UTC time, and the handler's time from rpc.now
    assert.matches("%d%d:%d%d:%d%dZ id=[%x-]+ body=1B [%d.]+ms ok reply=1B\n", server:output())
    server:kill("TERM")
    assert.equal(0, server:wait(5), server:output())
  end)

  it("installs rabbitrpc-broker, whose state folder is where it runs, not in the tree", function()
    local function broker(args, port)   -- without RPC_BROKER_PORT: the default port
      return installed("rabbitrpc-broker", args, port and {RPC_BROKER_PORT = port})
    end
    local out, status, err = broker("url")
    assert.equal(0, status, out .. err)
    assert.equal("amqp://guest:guest@localhost:5673/\n", out)
    assert.is_nil(os.execute("test -e " .. H.quote(dir .. "/.rabbitrpc-broker")))  -- url needs none
    out = broker("url", "5999")
    assert.equal("amqp://guest:guest@localhost:5999/\n", out)
    -- status (no broker on that port) makes the state folder: ./.rabbitrpc-broker
    out, status, err = broker("status", "5999")
    assert.equal(3, status, out .. err)
    assert.equal("broker: rabbitrpc-5999@localhost not running\n", out)
    assert.is_true(os.execute("test -d " .. H.quote(dir .. "/.rabbitrpc-broker")))
    assert.is_nil(os.execute("test -e " .. H.quote(tree .. "/.broker")))
  end)
end)
