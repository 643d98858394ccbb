-- The RabbitMQ tutorial 6 RPC client: asks the fib server for fib(n).
--   RPC_URL=amqp://guest:guest@localhost:5673/ lua5.4 examples/fib_client.lua 30
package.path = arg[0]:gsub("[^/]*$", "") .. "../lua/?.lua;" .. package.path     -- run from a checkout
package.cpath = arg[0]:gsub("[^/]*$", "") .. "../build/?.so;" .. package.cpath
local rpc = require "rpc"

local n = arg[1] or "30"
local client <close>, message, kind = rpc.client(os.getenv("RPC_QUEUE") or "rpc_queue")
if client then
  print((" [x] Requesting fib(%s)"):format(n))
  message, kind = nil, nil
  local reply
  reply, message, kind = client:call(n, 10)
  if reply then
    print((" [.] Got %s"):format(reply))
    return
  end
end
io.stderr:write("fib_client: ", message, " (", kind, ")\n")
os.exit(1)
