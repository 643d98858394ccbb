---@meta rpc.cqueues
-- LuaLS definitions for `rpc.cqueues` (lua/rpc/cqueues.lua). Requiring it makes waits in the
-- coroutines a cqueues controller runs (client:call, client:wait, client:call_all,
-- conn:receive, rpc.sleep) yield to the controller instead of holding it. Needs lua-cqueues.

local cqueues = {}

---Has controller `cq` serve `server` until the server is closed (cq:wrap of a loop that polls
---the server and steps it); its handlers run in threads of their own, as ever.
---@param cq table a cqueues controller (cqueues.new())
---@param server rpc.Server
---@return table cq the controller (what cq:wrap returns)
function cqueues.serve(cq, server) end

return cqueues
