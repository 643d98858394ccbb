-- README.md's opening example, run as a newcomer would: its server part in one process, its
-- client part in another, both taken from the README itself.
local H = require "support.helpers"

local QUEUE = "rpc_queue"   -- the example's own queue, on the spec broker

--- The parts of README's first ```lua block, each starting at a line "-- <name>.lua...":
-- {name = source}.
local function readme_example()
  local readme = H.read_file(H.ROOT .. "/README.md")
  local block = assert(readme:match("```lua\n(.-\n)```"), "README.md has no ```lua block")
  local parts, name = {}, nil
  for line in block:gmatch("(.-)\n") do
    local starts = line:match("^%-%- ([%w_]+%.lua)")
    if starts then name = starts end
    if name then parts[name] = (parts[name] or "") .. line .. "\n" end
  end
  assert(parts["fib_server.lua"] and parts["fib_client.lua"],
    "README's opening example must show two files, each under a line '-- fib_server.lua ...' "
    .. "and '-- fib_client.lua ...'; it is:\n" .. block)
  return parts
end

describe("the README's opening example", function()
  teardown(H.cleanup)

  it("prints 832040 when its client file runs while its server file serves, in another process", function()
    local T = H.scope(finally)
    local parts = readme_example()
    -- rpc_queue is not a fresh name: make sure nobody else serves it here, and remove it after
    local existing = H.amqp1 {op = "count", queue = QUEUE}
    assert(existing.error or existing.consumers == 0,
      "rpc_queue already has a consumer on the spec broker " .. H.URL)
    H.amqp1 {op = "delete", queue = QUEUE}
    T:defer(function() H.amqp1 {op = "delete", queue = QUEUE} end)
    local dir = H.tmpdir()
    for name, source in pairs(parts) do H.write_file(dir .. "/" .. name, source) end

    local server = T:spawn {sh = "exec " .. H.LUA .. " " .. H.quote(dir .. "/fib_server.lua")}
    H.wait_until(function()
      if server:status() then
        error("fib_server.lua exited (status " .. server:status() .. "):\n" .. server:output())
      end
      return (H.amqp1 {op = "count", queue = QUEUE}).consumers == 1
    end, 10, "fib_server.lua to consume rpc_queue; its output:\n" .. server:output())

    local out, status, err = H.run(H.LUA .. " " .. H.quote(dir .. "/fib_client.lua"))
    assert.equal(0, status, err)
    assert.equal("832040\n", out)
    assert.is_nil(server:status(), "fib_server.lua stopped serving:\n" .. server:output())
  end)
end)

--- The ```lua block after README's "Testing your own services" marker.
local function readme_testing_example()
  local readme = H.read_file(H.ROOT .. "/README.md")
  local at = assert(readme:find("spec/readme_spec.lua runs this block", 1, true),
    "README has no testing example marker")
  return assert(readme:match("```lua\n(.-\n)```", at), "no ```lua block after the marker")
end

describe("the README's testing example", function()
  teardown(H.cleanup)

  it("is examples/service_spec.lua, and passes when busted runs it as a user would", function()
    local T = H.scope(finally)
    local example = readme_testing_example()
    assert.equal(H.read_file(H.ROOT .. "/examples/service_spec.lua"), example)
    local dir = H.tmpdir()
    H.write_file(dir .. "/service_spec.lua", example)
    H.write_file(dir .. "/no_config.lua", "return {}\n")   -- not the checkout's .busted
    local function test_queues()
      local out = H.ctl("list_queues", "name")
      local names = {}
      for name in out:gmatch("\n(test%-%d+%-%d+)%f[%s]") do names[#names + 1] = name end
      return names
    end
    local before = {}
    for _, name in ipairs(test_queues()) do before[name] = true end
    T:defer(function()   -- the echo server's queue is not auto-delete: remove what the run left
      for _, name in ipairs(test_queues()) do
        if not before[name] then H.ctl("delete_queue", name) end
      end
    end)
    -- the module from LUA_PATH/LUA_CPATH (an installed rock's are on the default paths), the
    -- broker from RPC_URL, the example server's script relative to the project root
    local out, status, err = H.run(("%s /usr/bin/busted -C %s -f %s -o plainTerminal %s"):format(
      H.LUA, H.quote(H.ROOT), H.quote(dir .. "/no_config.lua"), H.quote(dir .. "/service_spec.lua")),
      {LUA_PATH = H.LUA_PATH, LUA_CPATH = H.LUA_CPATH, RPC_URL = H.URL})
    assert.equal(0, status, out .. err)
    assert.matches("3 successes / 0 failures / 0 errors", out, 1, true)
  end)
end)
