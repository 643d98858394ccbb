-- RabbitMQ tutorial 5 (topics), the emitter: one log line with a routing key like
-- "<facility>.<severity>", through the topic exchange "topic_logs".
--   RPC_URL=amqp://guest:guest@localhost:5673/ lua5.4 examples/emit_log_topic.lua kern.critical Panic!
package.path = arg[0]:gsub("[^/]*$", "") .. "../lua/?.lua;" .. package.path     -- run from a checkout
package.cpath = arg[0]:gsub("[^/]*$", "") .. "../build/?.so;" .. package.cpath
local rpc = require "rpc"

local function check(ok, ...)  -- a failure (nil, message, kind) ends the script
  if ok then return ok, ... end
  io.stderr:write("emit_log_topic: ", ..., " (", select(2, ...), ")\n")
  os.exit(1)
end

local exchange = os.getenv("RPC_EXCHANGE") or "topic_logs"
local routing_key = #arg > 1 and arg[1] or "anonymous.info"  -- as the tutorial: only with a message
local message = #arg > 1 and table.concat(arg, " ", 2) or "Hello World!"
local conn <close> = check(rpc.connect())
check(conn:declare_exchange(exchange, "topic"))
check(conn:publish(exchange, routing_key, message))
print((" [x] Sent %s:%s"):format(routing_key, message))
