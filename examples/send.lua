-- RabbitMQ tutorial 1 (hello world), the sender: one message to queue "hello".
--   RPC_URL=amqp://guest:guest@localhost:5673/ lua5.4 examples/send.lua
package.path = arg[0]:gsub("[^/]*$", "") .. "../lua/?.lua;" .. package.path     -- run from a checkout
package.cpath = arg[0]:gsub("[^/]*$", "") .. "../build/?.so;" .. package.cpath
local rpc = require "rpc"

local function check(ok, ...)  -- a failure (nil, message, kind) ends the script
  if ok then return ok, ... end
  io.stderr:write("send: ", ..., " (", select(2, ...), ")\n")
  os.exit(1)
end

local queue = os.getenv("RPC_QUEUE") or "hello"
local conn <close> = check(rpc.connect())
check(conn:declare_queue(queue))
check(conn:publish("", queue, "Hello World!"))
print(" [x] Sent 'Hello World!'")
