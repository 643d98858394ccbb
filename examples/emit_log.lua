-- RabbitMQ tutorial 3 (publish/subscribe), the emitter: one log line to every receiver, through
-- the fanout exchange "logs".
--   RPC_URL=amqp://guest:guest@localhost:5673/ lua5.4 examples/emit_log.lua info: Hello World!
package.path = arg[0]:gsub("[^/]*$", "") .. "../lua/?.lua;" .. package.path     -- run from a checkout
package.cpath = arg[0]:gsub("[^/]*$", "") .. "../build/?.so;" .. package.cpath
local rpc = require "rpc"

local function check(ok, ...)  -- a failure (nil, message, kind) ends the script
  if ok then return ok, ... end
  io.stderr:write("emit_log: ", ..., " (", select(2, ...), ")\n")
  os.exit(1)
end

local exchange = os.getenv("RPC_EXCHANGE") or "logs"
local message = #arg > 0 and table.concat(arg, " ") or "info: Hello World!"
local conn <close> = check(rpc.connect())
check(conn:declare_exchange(exchange, "fanout"))
check(conn:publish(exchange, "", message))  -- lost if no receiver is bound: that is the point
print(" [x] Sent " .. message)
