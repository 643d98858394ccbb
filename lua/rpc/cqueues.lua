--- rpc.cqueues: rabbitrpc inside a cqueues controller. Once required, a call made from a
-- cqueues coroutine (client:call, client:wait, rpc.sleep) yields to cqueues instead of blocking
-- the controller, and M.serve(cq, server) has the controller serve a server (its handlers run
-- in threads of their own, as ever). Needs lua-cqueues; nothing else in rabbitrpc does.
local cqueues = require "cqueues"
local core = require "rpc.core"

local M = {}

-- waits in cqueues coroutines wait with cqueues.poll(object, seconds), yielding to the controller
-- (only in the coroutine the controller itself resumes: not in a coroutine nested inside it)
core._outside(cqueues.poll, function()
  local cq, resumed_by_it = cqueues.running()
  return cq ~= nil and resumed_by_it
end)

--- Serves server from controller cq until the server is closed: cq:wrap of a loop that polls
-- it (its socket, and the state's next due work) and steps.
function M.serve(cq, server)
  return cq:wrap(function()
    while server:step() and tostring(server) ~= "rpc.server (closed)" do
      cqueues.poll(server)
    end
  end)
end

return M
