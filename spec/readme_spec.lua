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
