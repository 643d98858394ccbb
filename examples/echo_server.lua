-- Request-reply echo: every request's body comes back unchanged (binary-safe).
--   RPC_URL=amqp://guest:guest@localhost:5673/ lua5.4 examples/echo_server.lua [queue]
package.path = arg[0]:gsub("[^/]*$", "") .. "../lua/?.lua;" .. package.path     -- run from a checkout
package.cpath = arg[0]:gsub("[^/]*$", "") .. "../build/?.so;" .. package.cpath
local rpc = require "rpc"

local log = function(line) io.stderr:write(line, "\n") end  -- reconnects, if the broker goes away
local server, message, kind = rpc.server(arg[1] or "echo", function(body) return body end, {log = log})
if server then
  print(" [x] Echoing requests")  -- the queue is declared and consumed from here on
  io.stdout:setvbuf("line")
  server, message, kind = server:run()  -- until Ctrl-C or SIGTERM
end
if not server then
  io.stderr:write("echo_server: ", message, " (", kind, ")\n")
  os.exit(1)
end
