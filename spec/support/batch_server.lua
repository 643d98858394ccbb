-- A server for spec/batching_spec.lua, run under strace: serves SPEC_QUEUE (prefetch 100) until
-- it has replied SPEC_COUNT times, then closes and exits 0.
local rpc = require "rpc"
local count = tonumber(os.getenv("SPEC_COUNT"))
local server = assert(rpc.server(os.getenv("SPEC_QUEUE"), function(body) return body end,
  {url = os.getenv("RPC_URL"), prefetch = 100}))
print("ready")
io.stdout:flush()
while server:stats().replies < count do assert(server:poll(1)) end
server:close()
