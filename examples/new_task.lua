-- RabbitMQ tutorial 2 (work queues), the producer: one persistent task to queue "task_queue".
--   RPC_URL=amqp://guest:guest@localhost:5673/ lua5.4 examples/new_task.lua First message.
package.path = arg[0]:gsub("[^/]*$", "") .. "../lua/?.lua;" .. package.path     -- run from a checkout
package.cpath = arg[0]:gsub("[^/]*$", "") .. "../build/?.so;" .. package.cpath
local rpc = require "rpc"

local function check(ok, ...)  -- a failure (nil, message, kind) ends the script
  if ok then return ok, ... end
  io.stderr:write("new_task: ", ..., " (", select(2, ...), ")\n")
  os.exit(1)
end

local queue = os.getenv("RPC_QUEUE") or "task_queue"
local message = #arg > 0 and table.concat(arg, " ") or "Hello World!"
local conn <close> = check(rpc.connect())
check(conn:declare_queue(queue, {durable = true}))  -- the queue survives a broker restart,
check(conn:publish("", queue, message, {persistent = true}))  -- and so does the task
print(" [x] Sent " .. message)
