-- RabbitMQ tutorial 1 (hello world), the receiver: prints the messages of queue "hello".
--   RPC_URL=amqp://guest:guest@localhost:5673/ lua5.4 examples/receive.lua
package.path = arg[0]:gsub("[^/]*$", "") .. "../lua/?.lua;" .. package.path     -- run from a checkout
package.cpath = arg[0]:gsub("[^/]*$", "") .. "../build/?.so;" .. package.cpath
local rpc = require "rpc"

local function check(ok, ...)  -- a failure (nil, message, kind) ends the script
  if ok then return ok, ... end
  io.stderr:write("receive: ", ..., " (", select(2, ...), ")\n")
  os.exit(1)
end

io.stdout:setvbuf("line")
local queue = os.getenv("RPC_QUEUE") or "hello"
local conn = check(rpc.connect())
check(conn:declare_queue(queue))
check(conn:consume(queue, {ack = false}))  -- the broker forgets each message once delivered
print(" [*] Waiting for messages. To exit press CTRL+C")
while true do  -- until Ctrl-C or SIGTERM
  local msg = check(conn:receive())
  print(" [x] Received " .. msg.body)
end
