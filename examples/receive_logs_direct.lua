-- RabbitMQ tutorial 4 (routing), the receiver: prints the log lines of the severities given,
-- bound by name to the direct exchange "direct_logs".
--   RPC_URL=amqp://guest:guest@localhost:5673/ lua5.4 examples/receive_logs_direct.lua warning error
package.path = arg[0]:gsub("[^/]*$", "") .. "../lua/?.lua;" .. package.path     -- run from a checkout
package.cpath = arg[0]:gsub("[^/]*$", "") .. "../build/?.so;" .. package.cpath
local rpc = require "rpc"

local function check(ok, ...)  -- a failure (nil, message, kind) ends the script
  if ok then return ok, ... end
  io.stderr:write("receive_logs_direct: ", ..., " (", select(2, ...), ")\n")
  os.exit(1)
end

if #arg == 0 then
  io.stderr:write(("Usage: %s [info] [warning] [error]\n"):format(arg[0]))
  os.exit(1)
end
io.stdout:setvbuf("line")
local exchange = os.getenv("RPC_EXCHANGE") or "direct_logs"
local conn = check(rpc.connect())
check(conn:declare_exchange(exchange, "direct"))
local queue = check(conn:declare_queue("", {exclusive = true}))
for _, severity in ipairs(arg) do check(conn:bind(queue, exchange, severity)) end
check(conn:consume(queue, {ack = false}))
print(" [*] Waiting for logs. To exit press CTRL+C")
while true do  -- until Ctrl-C or SIGTERM
  local msg = check(conn:receive())
  print((" [x] %s:%s"):format(msg.routing_key, msg.body))
end
