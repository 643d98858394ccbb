-- The rock as published: its rockspecs, the source rock, both rabbitmq-c header layouts, and
-- what lets the rabbitrpc command need nothing but rabbitrpc and argparse (rpc.now instead of
-- luasystem; one line when argparse is missing). Installing it: spec/install_spec.lua.
local H = require "support.helpers"

local LUAROCKS = "luarocks --lua-version=5.4"
local SCM = "rockspec/rabbitrpc-scm-1.rockspec"
local RELEASE = "rockspec/rabbitrpc-0.1.0-1.rockspec"
local URL = "git+https://github.com/rabbitrpc/rabbitrpc.git"

--- A rockspec's fields, as luarocks reads them (a Lua file of assignments).
local function load_rockspec(path)
  local t = {}
  assert(loadfile(path, "t", t))()
  return t
end

local function deep_equal(a, b)
  if type(a) ~= "table" or type(b) ~= "table" then return a == b end
  for k, v in pairs(a) do if not deep_equal(v, b[k]) then return false end end
  for k in pairs(b) do if a[k] == nil then return false end end
  return true
end

describe("the rockspecs", function()
  teardown(H.cleanup)

  it("pass luarocks lint", function()
    for _, path in ipairs {SCM, RELEASE} do
      local out, status, err = H.run(LUAROCKS .. " lint " .. path)
      assert.equal(0, status, path .. ": " .. out .. err)
      assert.equal("", out .. err, path)
    end
  end)

  it("differ only in version and source: scm-1 follows the default branch, 0.1.0-1 its tag", function()
    local scm, release = load_rockspec(SCM), load_rockspec(RELEASE)
    assert.equal("scm-1", scm.version)
    assert.equal("0.1.0-1", release.version)
    assert.same({url = URL}, scm.source)
    assert.same({url = URL, tag = "v0.1.0"}, release.source)
    scm.version, scm.source, release.version, release.source = nil, nil, nil, nil
    assert.is_true(deep_equal(scm, release))
  end)

  it("describe a publishable rock: homepage, maintainer, labels, MIT with a LICENSE", function()
    local r = load_rockspec(RELEASE)
    assert.equal("https://github.com/rabbitrpc/rabbitrpc", r.description.homepage)
    assert.is_string(r.description.maintainer)
    assert.is_true(#r.description.labels > 0)
    assert.equal("MIT", r.description.license)
    local license = assert(H.read_file("LICENSE"))
    assert.matches("^MIT License\n\nCopyright %(c%) 2026 the rabbitrpc authors\n", license)
  end)

  it("build every csrc file, declare argparse and install both commands", function()
    local r = load_rockspec(RELEASE)
    local listed, found = {}, {}
    for _, f in ipairs(r.build.modules["rpc.core"].sources) do listed[#listed + 1] = f end
    for f in io.popen("ls csrc/*.c"):lines() do found[#found + 1] = f end
    table.sort(listed)
    assert.same(found, listed)
    assert.is_true(H.contains(r.dependencies, "argparse >= 0.6"))
    assert.same({rabbitrpc = "bin/rabbitrpc", ["rabbitrpc-broker"] = "scripts/broker.sh"}, r.build.install.bin)
  end)

  it("name the version rpc._VERSION reports", function()
    local version = load_rockspec(RELEASE).version:match("^(.*)%-%d+$")
    assert.equal("rabbitrpc " .. version, require("rpc")._VERSION)
  end)
end)

describe("make rock", function()
  teardown(H.cleanup)

  -- it packs what git has committed: a tree exported without .git (a fresh-machine copy) has none
  local _, in_git = H.run("git rev-parse --is-inside-work-tree")
  local packs = in_git == 0 and it or pending
  packs("packs a source rock of the checkout's HEAD offline, the rockspec's url rewritten to it", function()
    local out, status, err = H.run("make -s rock")
    assert.equal(0, status, out .. err)
    local list = H.run("unzip -l build/rock/rabbitrpc-scm-1.src.rock")
    for _, f in ipairs {"rabbitrpc-scm-1.rockspec", "rabbitrpc/csrc/core.c", "rabbitrpc/csrc/rpc.h",
                        "rabbitrpc/LICENSE", "rabbitrpc/bin/rabbitrpc", "rabbitrpc/scripts/broker.sh"} do
      assert.matches(" " .. f .. "\n", list, 1, true)
    end
    assert.not_matches("rabbitrpc/.git/", list, 1, true)
  end)
end)

describe("the rabbitmq-c headers", function()
  local CC = os.getenv("CC") or "cc"
  local LUA_INCDIR = os.getenv("LUA_INCDIR") or "/usr/include/lua5.4"
  local SYSTEM = os.getenv("RABBITMQ_INCDIR") or "/usr/include"   -- where Debian's 0.11 lives
  local dir
  -- A fake 0.12 layout: rabbitmq-c/*.h forward to the system's 0.11 headers; the old names next
  -- to them are traps that fail unless reached through a rabbitmq-c/ header.
  lazy_setup(function()
    dir = H.tmpdir() .. "/layout-0.12"
    assert(os.execute("mkdir -p " .. H.quote(dir .. "/rabbitmq-c")))
    for new, old in pairs {amqp = "amqp", tcp_socket = "amqp_tcp_socket", ssl_socket = "amqp_ssl_socket"} do
      H.write_file(("%s/rabbitmq-c/%s.h"):format(dir, new), ([[
#define FAKE_INSIDE_RABBITMQ_C 1
#include "%s/%s.h"
#undef FAKE_INSIDE_RABBITMQ_C
]]):format(SYSTEM, old))
      H.write_file(("%s/%s.h"):format(dir, old), ([[
#ifndef FAKE_INSIDE_RABBITMQ_C
#error "the 0.11 name %s.h was included"
#endif
#include "%s/%s.h"
]]):format(old, SYSTEM, old))
    end
  end)
  teardown(H.cleanup)

  local function compile(files, include)
    return H.run(("%s -std=c99 -fsyntax-only -Wall -Wextra -H -I%s %s %s")
      :format(CC, H.quote(LUA_INCDIR), include and "-I" .. H.quote(include) or "", files))
  end

  it("come from <rabbitmq-c/...> when that layout is there (0.12 and later)", function()
    local out, status, err = compile("csrc/*.c", dir)
    assert.equal(0, status, out .. err)
    for _, h in ipairs {"amqp", "tcp_socket", "ssl_socket"} do
      assert.matches(dir .. "/rabbitmq-c/" .. h .. ".h", err, 1, true)
    end
    assert.not_matches("warning", err)
  end)

  it("come from <amqp.h> and its siblings otherwise (Debian 12's 0.11)", function()
    local out, status, err = compile("csrc/connection.c")
    assert.equal(0, status, out .. err)
    assert.matches(SYSTEM .. "/amqp_tcp_socket.h", err, 1, true)
    assert.not_matches("rabbitmq-c/", err, 1, true)
  end)

  it("(the traps work: an old name outside rabbitmq-c/ fails)", function()
    H.write_file(dir .. "/old.c", "#include <amqp.h>\n")
    local _, status, err = compile(H.quote(dir .. "/old.c"), dir)
    assert.is_not.equal(0, status)
    assert.matches("the 0.11 name amqp.h was included", err, 1, true)
  end)
end)

describe("rpc.now", function()
  local rpc = require "rpc"

  it("returns monotonic seconds as a float", function()
    local t0 = rpc.now()
    assert.equal("float", math.type(t0))
    local last = t0
    for _ = 1, 1000 do
      local t = rpc.now()
      assert.is_true(t >= last)
      last = t
    end
    assert.is_true(rpc.sleep(0.05))
    local slept = rpc.now() - t0
    assert.is_true(slept >= 0.05 and slept < 5, tostring(slept))
  end)
end)

describe("rabbitrpc without argparse", function()
  teardown(H.cleanup)
  local BIN = H.ROOT .. "/bin/rabbitrpc"
  local LINE = "rabbitrpc: needs the Lua module argparse (Debian: apt-get install lua-argparse; "
    .. "LuaRocks: luarocks install argparse)\n"

  it("prints one line and exits 2", function()
    -- the checkout's modules and build only: no default path, so no Debian argparse
    local env = {LUA_PATH_5_4 = H.ROOT .. "/lua/?.lua", LUA_CPATH_5_4 = H.BUILD .. "/?.so"}
    for _, args in ipairs {"--help", "call q body", ""} do
      local out, status, err = H.run(H.LUA .. " " .. H.quote(BIN) .. " " .. args, env)
      assert.equal(2, status, args)
      assert.equal("", out)
      assert.equal(LINE, err)
    end
  end)

  it("still shows the error of an argparse that fails to load", function()
    local lib = H.tmpdir() .. "/broken-argparse"
    assert(os.execute("mkdir -p " .. H.quote(lib)))
    H.write_file(lib .. "/argparse.lua", "error('broken on purpose')\n")
    local env = {LUA_PATH_5_4 = lib .. "/?.lua;" .. H.ROOT .. "/lua/?.lua", LUA_CPATH_5_4 = H.BUILD .. "/?.so"}
    local _, status, err = H.run(H.LUA .. " " .. H.quote(BIN) .. " --help", env)
    assert.equal(1, status)
    assert.matches("broken on purpose", err, 1, true)
    assert.not_matches("needs the Lua module", err, 1, true)
  end)
end)
