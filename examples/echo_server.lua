-- Request-reply echo: every request's body comes back unchanged (binary-safe).
--   RPC_URL=amqp://guest:guest@localhost:5673/ lua5.4 examples/echo_server.lua [queue]
package.path = arg[0]:gsub("[^/]*$", "") .. "../lua/?.lua;" .. package.path     -- run from a checkout
package.cpath = arg[0]:gsub("[^/]*$", "") .. "../build/?.so;" .. package.cpath
local rpc = require "rpc"

local queue = arg[1] or "echo"
print((" [x] Echoing requests on '%s'"):format(queue))
io.stdout:flush()
local ok, message, kind = rpc.serve(queue, function(body) return body end)
if not ok then
  io.stderr:write("echo_server: ", message, " (", kind, ")\n")
  os.exit(1)
end
