-- rabbitrpc echo server for the bench, written with the public API.
--   RPC_URL=... lua5.4 bench/lua_server.lua QUEUE PREFETCH
-- Prints "ready" once consuming, and {"served":N} when SIGTERM or SIGINT ends it.
package.path = arg[0]:gsub("[^/]*$", "") .. "../lua/?.lua;" .. package.path     -- run from a checkout
package.cpath = arg[0]:gsub("[^/]*$", "") .. "../build/?.so;" .. package.cpath
local rpc = require "rpc"

local queue, prefetch = arg[1], tonumber(arg[2])
assert(queue and prefetch, "usage: lua_server.lua QUEUE PREFETCH")

local server <close> = assert(rpc.server(queue, function(body) return body end,
                                         {prefetch = prefetch, auto_delete = true}))
io.stdout:write("ready\n")
io.stdout:flush()
assert(server:run())
io.stdout:write(('{"served":%d}\n'):format(server:stats().requests))
