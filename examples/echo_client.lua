-- Sends one message (the arguments, or standard input) to the echo server and prints the reply.
--   RPC_URL=amqp://guest:guest@localhost:5673/ lua5.4 examples/echo_client.lua hello world
package.path = arg[0]:gsub("[^/]*$", "") .. "../lua/?.lua;" .. package.path     -- run from a checkout
package.cpath = arg[0]:gsub("[^/]*$", "") .. "../build/?.so;" .. package.cpath
local rpc = require "rpc"

local body = #arg > 0 and table.concat(arg, " ") or io.read("a")
local client <close>, message, kind = rpc.client(os.getenv("RPC_QUEUE") or "echo")
local reply
if client then reply, message, kind = client:call(body, 10) end
if not reply then
  io.stderr:write("echo_client: ", message, " (", kind, ")\n")
  os.exit(1)
end
io.write(reply, "\n")
