--- rabbitrpc: RabbitMQ request-reply from Lua. The C core (rpc.core) does the work; this
-- module only names it, so errors raised by the core name the function the user called.
local core = require "rpc.core"

local M = {
  client = core.client,   -- rpc.client(queue [, opts])
  server = core.server,   -- rpc.server(queue, handler [, opts])
  serve = core.serve,     -- rpc.serve(queue, handler [, opts]): server + run + close
  connect = core.connect, -- rpc.connect([opts]): publish, declare, bind, consume, receive, ack
  _VERSION = core._VERSION,
}

return M
