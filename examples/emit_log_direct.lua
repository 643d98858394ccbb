-- RabbitMQ tutorial 4 (routing), the emitter: one log line with its severity as routing key,
-- through the direct exchange "direct_logs".
--   RPC_URL=amqp://guest:guest@localhost:5673/ lua5.4 examples/emit_log_direct.lua error Run. Run.
package.path = arg[0]:gsub("[^/]*$", "") .. "../lua/?.lua;" .. package.path     -- run from a checkout
package.cpath = arg[0]:gsub("[^/]*$", "") .. "../build/?.so;" .. package.cpath
local rpc = require "rpc"

local function check(ok, ...)  -- a failure (nil, message, kind) ends the script
  if ok then return ok, ... end
  io.stderr:write("emit_log_direct: ", ..., " (", select(2, ...), ")\n")
  os.exit(1)
end

local exchange = os.getenv("RPC_EXCHANGE") or "direct_logs"
local severity = #arg > 1 and arg[1] or "info"  -- as the tutorial: only with a message after it
local message = #arg > 1 and table.concat(arg, " ", 2) or "Hello World!"
local conn <close> = check(rpc.connect())
check(conn:declare_exchange(exchange, "direct"))
check(conn:publish(exchange, severity, message))
print((" [x] Sent %s:%s"):format(severity, message))
