--- rabbitrpc: RabbitMQ request-reply from Lua. The C core (rpc.core) does the work; this
-- module only names it, so errors raised by the core name the function the user called.
local core = require "rpc.core"

local M = {
  client = core.client,   -- rpc.client(queue [, opts])
  server = core.server,   -- rpc.server(queue, handler [, opts])
  serve = core.serve,     -- rpc.serve(queue, handler [, opts]): server + run + close
  connect = core.connect, -- rpc.connect([opts]): publish, declare, bind, consume, receive, ack
  sleep = core.sleep,     -- rpc.sleep(seconds): in a handler, suspends only it
  now = core.now,         -- rpc.now(): monotonic seconds (a float), the clock timeouts use
  remaining = core.remaining, -- rpc.remaining(): seconds left to the served request's deadline, or nil
  _VERSION = core._VERSION,
}

-- A function called without a name (pcall(rpc.client, {})) is named in its bad argument error
-- by searching package.loaded with lua_next; finding it in rpc.core's table there would name
-- it 'rpc.core.client'. So rpc.core is left registered as an empty table that reads through
-- to the core: require("rpc.core").client still works, and only this module holds the names.
package.loaded["rpc.core"] = setmetatable({}, {
  __index = core,
  __pairs = function() return next, core, nil end,
})

return M
