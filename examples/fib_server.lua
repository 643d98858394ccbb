-- The RabbitMQ tutorial 6 RPC server: replies fib(n) to requests on queue rpc_queue.
--   RPC_URL=amqp://guest:guest@localhost:5673/ lua5.4 examples/fib_server.lua
package.path = arg[0]:gsub("[^/]*$", "") .. "../lua/?.lua;" .. package.path     -- run from a checkout
package.cpath = arg[0]:gsub("[^/]*$", "") .. "../build/?.so;" .. package.cpath
local rpc = require "rpc"

local MAX_N = 92  -- fib(93) no longer fits a 64-bit integer

local function fib(n)
  local a, b = 0, 1
  for _ = 1, n do a, b = b, a + b end
  return a
end

local function handle(body)
  local n = math.tointeger(tonumber(body))
  if not n or n < 0 or n > MAX_N then
    error(("fib: n must be an integer from 0 to %d, got '%s'"):format(MAX_N, body), 0)
  end
  print((" [.] fib(%d)"):format(n))
  return fib(n)
end

local log = function(line) io.stderr:write(line, "\n") end  -- reconnects, if the broker goes away
local server, message, kind = rpc.server(os.getenv("RPC_QUEUE") or "rpc_queue", handle, {log = log})
if server then
  print(" [x] Awaiting RPC requests")  -- the queue is declared and consumed from here on
  io.stdout:setvbuf("line")
  server, message, kind = server:run()  -- until Ctrl-C or SIGTERM
end
if not server then
  io.stderr:write("fib_server: ", message, " (", kind, ")\n")
  os.exit(1)
end
