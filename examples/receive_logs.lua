-- RabbitMQ tutorial 3 (publish/subscribe), the receiver: prints every log line sent to the
-- fanout exchange "logs" from now on, through a queue of its own.
--   RPC_URL=amqp://guest:guest@localhost:5673/ lua5.4 examples/receive_logs.lua
package.path = arg[0]:gsub("[^/]*$", "") .. "../lua/?.lua;" .. package.path     -- run from a checkout
package.cpath = arg[0]:gsub("[^/]*$", "") .. "../build/?.so;" .. package.cpath
local rpc = require "rpc"

local function check(ok, ...)  -- a failure (nil, message, kind) ends the script
  if ok then return ok, ... end
  io.stderr:write("receive_logs: ", ..., " (", select(2, ...), ")\n")
  os.exit(1)
end

io.stdout:setvbuf("line")
local exchange = os.getenv("RPC_EXCHANGE") or "logs"
local conn = check(rpc.connect())
check(conn:declare_exchange(exchange, "fanout"))
local queue = check(conn:declare_queue("", {exclusive = true}))  -- amq.gen-..., gone with us
check(conn:bind(queue, exchange))
check(conn:consume(queue, {ack = false}))
print(" [*] Waiting for logs. To exit press CTRL+C")
while true do  -- until Ctrl-C or SIGTERM
  local msg = check(conn:receive())
  print(" [x] " .. msg.body)
end
