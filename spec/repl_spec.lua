-- README.md's REPL walk-through, fed line by line to a real `lua5.4 -i`: the transcript in the
-- README must be exactly what the user sees.
local H = require "support.helpers"

--- The ```text block after README's repl-session marker.
local function readme_session()
  local readme = H.read_file(H.ROOT .. "/README.md")
  local at = assert(readme:find("spec/repl_spec.lua feeds", 1, true), "README has no REPL walk-through")
  local block = assert(readme:match("```text\n(.-)\n```", at), "no ```text block after the marker")
  return block
end

describe("the README's REPL walk-through", function()
  teardown(H.cleanup)

  it("prints exactly what README.md shows when its lines are typed into lua5.4 -i", function()
    local session = readme_session()
    local input = {}
    for line in (session .. "\n"):gmatch("(.-)\n") do
      local typed = line:match("^> (.+)$") or line:match("^>> (.+)$")
      if typed then input[#input + 1] = typed end
    end
    assert.is_true(#input >= 10, "the walk-through is too short to mean anything")
    local file = H.tmpdir() .. "/repl-input.lua"
    H.write_file(file, table.concat(input, "\n") .. "\n")
    -- as the README says: RPC_URL from the environment, the module from the checkout
    local out, status, err = H.run("sh -c " .. H.quote(H.LUA .. " -i < " .. H.quote(file)),
                                   {LUA_PATH = H.LUA_PATH, LUA_CPATH = H.LUA_CPATH,
                                    -- readline echoes each line; on a terminal it does not know
                                    -- (no TERM: CI, a chroot) it scrolls lines past 80 columns
                                    TERM = "dumb", COLUMNS = "10000"})
    assert.equal(0, status, err)
    local shown = out:gsub("^Lua [^\n]*\n", "")  -- the banner's version is the machine's
    assert.equal(session:gsub("%s+$", ""), (shown:gsub("%s+$", "")))
    H.assert_no_password(out .. err)
    H.amqp {{op = "delete", queue = "upper"}, {op = "delete", queue = "broken"},
            {op = "delete", queue = "inbox"}}
  end)
end)
