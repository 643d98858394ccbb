-- An echo RPC server driven by libuv (lua-luv) instead of server:run(): the recipe for any
-- event loop. rabbitrpc's objects speak cqueues' pollable protocol: pollfd() (a descriptor that
-- polls readable when any of the state's sockets has input), timeout() (seconds until work is
-- due without input: heartbeats, reconnects, suspended handlers' deadlines) and step() (do what
-- is ready, never waiting for input). Handlers still run in threads of their own and may wait.
--   RPC_URL=amqp://guest:guest@localhost:5673/ lua5.4 examples/luv_server.lua
package.path = arg[0]:gsub("[^/]*$", "") .. "../lua/?.lua;" .. package.path     -- run from a checkout
package.cpath = arg[0]:gsub("[^/]*$", "") .. "../build/?.so;" .. package.cpath
local uv = require "luv"
local rpc = require "rpc"

local server = assert(rpc.server(os.getenv("RPC_QUEUE") or "echo", function(body)
  rpc.sleep(0.1)  -- suspends this request only: the others, and the rest of the loop, go on
  return body
end, {prefetch = 20}))

local timer = uv.new_timer()
local function step()
  server:step()
  local wait = server:timeout()
  timer:stop()
  if wait then timer:start(math.ceil(wait * 1000), 0, step) end
end
-- one descriptor for everything rabbitrpc reads in this Lua state, for the state's whole life
uv.new_poll(server:pollfd()):start("r", step)

local ticks = 0
uv.new_timer():start(100, 100, function() ticks = ticks + 1 end)  -- the loop stays free
local stop = uv.new_signal()
stop:start("sigterm", function() uv.stop() end)
print(" [x] Awaiting RPC requests (libuv)")
io.stdout:setvbuf("line")
step()
uv.run()
print((" [x] Stopped after %d ticks of another timer"):format(ticks))
server:close()
