-- RabbitMQ tutorial 2 (work queues), the worker: one task of queue "task_queue" at a time, a
-- second of work per "." in it, acked once done (a worker that dies leaves its task to another).
--   RPC_URL=amqp://guest:guest@localhost:5673/ lua5.4 examples/worker.lua
package.path = arg[0]:gsub("[^/]*$", "") .. "../lua/?.lua;" .. package.path     -- run from a checkout
package.cpath = arg[0]:gsub("[^/]*$", "") .. "../build/?.so;" .. package.cpath
local rpc = require "rpc"

local function check(ok, ...)  -- a failure (nil, message, kind) ends the script
  if ok then return ok, ... end
  io.stderr:write("worker: ", ..., " (", select(2, ...), ")\n")
  os.exit(1)
end

local has_system, system = pcall(require, "system")  -- luasystem, if installed
local sleep = has_system and system.sleep or function(s) os.execute("sleep " .. s) end

io.stdout:setvbuf("line")
local queue = os.getenv("RPC_QUEUE") or "task_queue"
local conn = check(rpc.connect())
check(conn:declare_queue(queue, {durable = true}))
check(conn:consume(queue, {prefetch = 1}))  -- manual acks; no new task before the ack
print(" [*] Waiting for messages. To exit press CTRL+C")
while true do  -- until Ctrl-C or SIGTERM
  local msg = check(conn:receive())
  print(" [x] Received " .. msg.body)
  sleep(select(2, msg.body:gsub("%.", "")))  -- the "work": a second per "."
  print(" [x] Done")
  check(conn:ack(msg.delivery_tag))
end
