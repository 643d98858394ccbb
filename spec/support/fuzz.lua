--- The child side of spec/api_fuzz_spec.lua. Loaded in a fresh lua5.4 (the spec's storm()), so
-- that a crash fails one spec with its output instead of killing busted. It throws Lua values at the
-- rpc API and checks every outcome is one the API allows (README "API"):
--   * success, with results of the documented shape;
--   * a raised error whose message contains "bad argument";
--   * nil, message, kind: exactly three values, message a string, kind a documented kind.
-- Anything else prints one "VIOLATION <call>: <what happened>" line. F.finish() then checks a
-- normal call still works and prints "DONE"; the process must then exit 0 (finalizers run).
--
-- Nothing here blocks for long: every queue called is served in this process (a client's wait
-- serves the servers of its Lua state), timeouts are short, and run()/serve() are stopped by a
-- request to a "stopper" server whose handler sends this process SIGTERM (run() returns true).
local rpc = require "rpc"

local F = {}

io.stdout:setvbuf("line")

F.URL = assert(os.getenv("RPC_URL"), "RPC_URL")
F.AMQPS = F.URL:gsub("^amqp:", "amqps:")   -- TLS to a plain AMQP port: the handshake fails fast
F.TOOL = os.getenv("SPEC_AMQP_TOOL")
F.KINDS = {}
for kind in ("timeout no_route remote connection auth closed broker blocked interrupted tls too_large stale codec")
    :gmatch("%S+") do
  F.KINDS[kind] = true
end
F.checked, F.violations = 0, 0
F.MAX_SHOWN = 300        -- violation lines printed; all are counted

local MiB = string.rep("m", 1 << 20)
F.MiB = MiB

local PID = tonumber(io.open("/proc/self/stat"):read("a"):match("^(%d+)"))

local function hex(n)
  local f = assert(io.open("/dev/urandom", "rb"))
  local s = f:read(n)
  f:close()
  return (s:gsub(".", function(c) return ("%02x"):format(c:byte()) end))
end

local leftovers = {}     -- queues that outlive their server: the parent deletes them

--- A fresh queue name; keep = true when the queue may outlive this process.
function F.queue(what, keep)
  local name = "spec-fuzz-" .. what .. "-" .. hex(4)
  if keep then leftovers[#leftovers + 1] = name end
  return name
end

function F.leftover(name)
  leftovers[#leftovers + 1] = name
end

local leftover_exchanges = {}   -- exchanges the storm may have declared: the parent deletes them

--- A fresh exchange name; the parent deletes the exchange, should it have been declared.
function F.exchange(what)
  local name = "spec-fuzz-x-" .. what .. "-" .. hex(4)
  leftover_exchanges[#leftover_exchanges + 1] = name
  return name
end

function F.leftover_exchange(name)
  leftover_exchanges[#leftover_exchanges + 1] = name
end

--- Whether the broker has a queue of that name (asked through pika, spec/support/amqp_tool.py).
function F.queue_exists(name)
  local p = assert(io.popen(("/usr/bin/python3 %s ops '[{\"op\": \"count\", \"queue\": \"%s\"}]'")
    :format(F.TOOL, name)))
  local out = p:read("a")
  p:close()
  return out:find('"ok": true', 1, true) ~= nil
end

-- ---- describing values without running their metamethods ----

local function show(v)
  local t = type(v)
  if t == "string" then
    local s = #v > 240 and v:sub(1, 240) .. ("...(%d bytes)"):format(#v) or v
    return (("%q"):format(s):gsub("\\\n", "\\n"))
  elseif t == "number" or t == "boolean" or t == "nil" then
    return tostring(v)
  end
  return t
end
F.show = show

local function show_all(r, from)
  local parts = {}
  for i = from, r.n do parts[#parts + 1] = show(r[i]) end
  return ("%d value(s): %s"):format(r.n - from + 1, table.concat(parts, ", "))
end

function F.violation(label, what)
  F.violations = F.violations + 1
  if F.violations <= F.MAX_SHOWN then
    print(("VIOLATION %s: %s"):format(label, what))
    io.stdout:flush()
  end
  return "violation"
end

-- ---- the rule ----

local tally = {}         -- outcome -> how many

local function check(label, valid, fn, ...)
  F.checked = F.checked + 1
  io.stderr:write("at: ", label, "\n")   -- unbuffered: the last one names a crash or a hang
  local r = table.pack(pcall(fn, ...))
  if not r[1] then
    local err = r[2]
    if type(err) == "string" and err:find("bad argument", 1, true) then return "bad", err end
    return F.violation(label, "raised " .. show(err))
  end
  if r.n >= 2 and r[2] == nil then
    if r.n == 4 and type(r[3]) == "string" and F.KINDS[r[4]] then return r[4], r[3] end
    return F.violation(label, "returned " .. show_all(r, 2))
  end
  local ok, why = valid(label, table.unpack(r, 2, r.n))
  if not ok then
    return F.violation(label, ("succeeded wrongly (%s): %s"):format(why, show_all(r, 2)))
  end
  return "ok", table.unpack(r, 2, r.n)
end

--- Calls fn(...) under pcall and checks the outcome. valid(label, ...results) says whether a
-- success has the right shape (true, or false and why). Returns "ok" and the results, "bad"
-- (a bad argument), the kind of a documented failure, or "violation".
function F.check(label, valid, fn, ...)
  local r = table.pack(check(label, valid, fn, ...))
  tally[r[1]] = (tally[r[1]] or 0) + 1
  return table.unpack(r, 1, r.n)
end

--- Like check, but only success is right (what must still work after the storm).
function F.must(label, valid, fn, ...)
  local outcome, a, b = F.check(label, valid, fn, ...)
  if outcome ~= "ok" and outcome ~= "violation" then
    F.violation(label, ("must succeed, got %s: %s"):format(outcome, show(a)))
  end
  return outcome, a, b
end

--- A list of n copies of the broker's url (opts.urls takes at most 64).
function F.urls(n)
  local t = {}
  for i = 1, n do t[i] = F.URL end
  return t
end

-- ---- validators for successes ----

function F.any() return true end

function F.nothing(_, ...)
  if select("#", ...) ~= 0 then return false, "expected no results" end
  return true
end

function F.string_reply(_, s)
  if type(s) ~= "string" then return false, "a string expected" end
  return true
end

--- A reply equal to want (the body as Lua turns it into a string); any string when want is nil.
function F.reply_is(want)
  return function(_, s)
    if type(s) ~= "string" then return false, "a string expected" end
    if want and s ~= want then return false, "expected the echo " .. show(want) end
    return true
  end
end

--- What an echo of body is: its text for a string or number, else nil (no expectation).
function F.echo_of(body)
  if type(body) == "string" then return body end
  if type(body) == "number" then return tostring(body) end
  return nil
end

--- Whether v is an object of the type named "rpc.client" or "rpc.server", by its tostring.
function F.is(v, typename)
  local ok, s = pcall(tostring, v)
  return type(v) == "userdata" and ok and type(s) == "string" and s:sub(1, #typename + 1) == typename .. " "
end

--- The queue a server consumes, from its tostring (the one place it shows).
function F.queue_of(server)
  return tostring(server):match("queue '(.-)', prefetch")
end

--- A new client: a call through it (to F.echo's queue unless it was given another) gets an
-- allowed outcome; then it is closed.
function F.new_client(label, c)
  if not F.is(c, "rpc.client") then return false, "an rpc.client expected" end
  F.check(label .. " then :call", F.string_reply, c.call, c, "ping")
  c:close()
  return true
end

--- rpc.server/rpc.serve(args...) declared a queue: unless auto_delete, the parent deletes it.
function F.declared(args)
  local opts = args.n >= 3 and args[3] or nil
  local auto_delete = type(opts) == "table" and rawget(opts, "auto_delete") == true
  if args.n >= 1 and type(args[1]) == "string" and not auto_delete then F.leftover(args[1]) end
end

--- A new server: a call to its queue gets an allowed outcome; then it is closed.
function F.new_server(label, s, args)
  if not F.is(s, "rpc.server") then return false, "an rpc.server expected" end
  if args then F.declared(args) end
  local queue = F.queue_of(s)
  if queue then
    F.check(label .. " then a call to it", F.reply_is("ping"), F.client.call, F.client, "ping", 1,
            {routing_key = queue})
  end
  s:close()
  return true
end

function F.is_true(_, v)
  if v ~= true then return false, "true expected" end
  return true
end

function F.count(_, n)
  if math.type(n) ~= "integer" or n < 0 then return false, "an integer >= 0 expected" end
  return true
end

function F.table_of_counts(_, t)
  if type(t) ~= "table" then return false, "a table expected" end
  for k, v in pairs(t) do
    if k == "latency" or k == "handler_time" then  -- a histogram's figures
      if type(v) ~= "table" or math.type(v.count) ~= "integer" or v.count < 0 then
        return false, "field " .. k .. " is not a histogram {count = n, ...}"
      end
      for _, f in ipairs {"p50", "p90", "p99", "max"} do
        if type(v[f]) ~= "number" or v[f] < 0 then return false, "field " .. k .. "." .. f .. " is not a number >= 0" end
      end
    elseif k ~= "connected" and k ~= "last_error" and math.type(v) ~= "integer" then
      return false, "field " .. k .. " is not an integer"
    end
  end
  return true
end

function F.tostring_result(_, s)
  if type(s) ~= "string" or not s:find("^rpc%.") then return false, "'rpc.<type> (...)' expected" end
  if s:find(":guest@", 1, true) then return false, "it shows the password" end
  return true
end

-- ---- the process under test: an echo server, a client of it, objects to pass around ----

local function echo(body) return body end

--- Runs the run()/serve() in fn(...) so that it returns: a request to the stopper is queued
-- first, and the stopper's handler (served by run's loop) sends this process SIGTERM, on which
-- run() returns true. A stopper request served outside a run does nothing.
function F.bounded(fn)
  return function(...)
    -- a long timeout: a stop left queued by a call that never ran must not expire unread (a
    -- server skips requests past their deadline) while the runs after it wait for a stop;
    -- asserted: a stop that was not sent would leave the run below waiting for ever
    assert(F.client:send("stop", {routing_key = F.stop_queue, timeout = 600}))
    F.serving = true
    local r = table.pack(pcall(fn, ...))
    F.serving = false
    if not r[1] then error(r[2], 0) end
    return table.unpack(r, 2, r.n)
  end
end

local function stopper()
  if F.serving then os.execute("kill -TERM " .. PID) end
  return ""
end

function F.setup()
  F.echo_queue = F.queue("echo")
  F.echo = assert(rpc.server(F.echo_queue, echo, {url = F.URL, auto_delete = true}))
  F.client = assert(rpc.client(F.echo_queue, {url = F.URL, timeout = 2}))
  F.stop_queue = F.queue("stop")
  F.stopper = assert(rpc.server(F.stop_queue, stopper, {url = F.URL, auto_delete = true}))
  F.closed_client = assert(rpc.client(F.echo_queue, {url = F.URL}))
  F.closed_client:close()
  F.closed_server = assert(rpc.server(F.queue("closed"), echo, {url = F.URL, auto_delete = true}))
  F.closed_server:close()
  F.closed_connection = assert(rpc.connect {url = F.URL})
  F.closed_connection:close()
  F.connection_methods = getmetatable(F.closed_connection).__index
  F.connection_meta = getmetatable(F.closed_connection)
  F.client_methods = getmetatable(F.client).__index
  F.server_methods = getmetatable(F.echo).__index
  F.client_meta = getmetatable(F.client)
  F.server_meta = getmetatable(F.echo)
end

-- the values; F.NONE stands for "no argument at all"
F.NONE = setmetatable({}, {__name = "none"})

local function boom(what)
  return function() error("EVIL " .. what, 2) end
end
local EVIL_MT = {
  __index = boom "__index", __newindex = boom "__newindex", __len = boom "__len",
  __pairs = boom "__pairs", __tostring = boom "__tostring", __eq = boom "__eq",
  __call = boom "__call", __concat = boom "__concat", __lt = boom "__lt", __le = boom "__le",
  __close = boom "__close", __name = {},
}
--- A table whose every metamethod raises: the API must never run one.
function F.evil(t)
  return setmetatable(t or {}, EVIL_MT)
end

local function dead_coroutine()
  local co = coroutine.create(function() end)
  coroutine.resume(co)
  return co
end

function F.open_client()
  if not F.other or tostring(F.other):find("closed", 1, true) then
    F.other = assert(rpc.client(F.echo_queue, {url = F.URL, timeout = 2}))
  end
  return F.other
end

--- The storm's shared connection, made anew when closed.
function F.open_connection()
  if not F.connection or tostring(F.connection):find("closed", 1, true) then
    F.connection = assert(rpc.connect {url = F.URL})
  end
  return F.connection
end

function F.open_server()
  if not F.other_server or tostring(F.other_server):find("closed", 1, true) then
    F.other_server = assert(rpc.server(F.queue("other"), echo, {url = F.URL, auto_delete = true}))
  end
  return F.other_server
end

--- Every value of the storm, as a list of {name, value}; objects are made anew when closed.
function F.values()
  local gc_raises = setmetatable({}, {__gc = boom "__gc"})
  return {
    {"none", F.NONE},
    {"nil", nil},
    {"true", true},
    {"false", false},
    {"0", 0},
    {"-0.0", -0.0},
    {"1", 1},
    {"-1", -1},
    {"NaN", 0 / 0},
    {"math.huge", math.huge},
    {"-math.huge", -math.huge},
    {"2^53", 2 ^ 53},
    {"2^63", 2 ^ 63},
    {"math.maxinteger", math.maxinteger},
    {"math.mininteger", math.mininteger},
    {"1e308", 1e308},
    {"0.5", 0.5},
    {'""', ""},
    {'"\\0"', "\0"},
    {'"a\\0b"', "a\0b"},
    {"1 MiB string", MiB},
    {"300-byte string", string.rep("s", 300)},
    {'"amqp://"', "amqp://"},
    {'"amqps://"', "amqps://"},
    {"url with vhost %00", F.URL .. "%00"},
    {"{}", {}},
    {"{1,2,3}", {1, 2, 3}},
    {"table with raising metamethods", F.evil()},
    {"table whose __gc raises", gc_raises},
    {"function", echo},
    {"raising function", boom "function"},
    {"suspended coroutine", coroutine.create(echo)},
    {"dead coroutine", dead_coroutine()},
    {"main thread (normal)", F.main_thread},
    {"running coroutine", (coroutine.running())},
    {"io.stdout (userdata)", io.stdout},
    {"closed client", F.closed_client},
    {"closed server", F.closed_server},
    {"open client", F.open_client()},
    {"open server", F.open_server()},
    {"closed connection", F.closed_connection},
    {"open connection", F.open_connection()},
    {"table with rpc.client's metatable", setmetatable({}, F.client_meta)},
  }
end

--- Values for opts.codec beyond F.values(): the valid ones, and codecs whose functions
-- misbehave (raise, yield, return the wrong type), which must cost a call at most a bad argument
-- or kind "codec" (or "remote", for a server's reply it cannot encode).
function F.codecs()
  local function same(v) return v end
  return {
    {'"json"', "json"}, {'"JSON"', "JSON"}, {'"json\\0"', "json\0"},
    {"an identity codec", {encode = tostring, decode = same}},
    {"an identity codec with a content_type", {encode = tostring, decode = same, content_type = "text/x-same"}},
    {"a codec with a 256-byte content_type", {encode = tostring, decode = same, content_type = ("c"):rep(256)}},
    {"a codec with an unknown key", {encode = tostring, decode = same, colour = 1}},
    {"{encode = f}", {encode = tostring}},
    {"a codec whose encode raises", {encode = boom "encode", decode = same}},
    {"a codec whose decode raises", {encode = tostring, decode = boom "decode"}},
    {"a codec whose decode raises a table", {encode = tostring, decode = function() error(F.evil()) end}},
    {"a codec whose decode yields", {encode = tostring, decode = coroutine.yield}},
    {"a codec whose decode returns nil", {encode = tostring, decode = function() return nil end}},
    {"a codec whose encode returns a table", {encode = function() return {} end, decode = same}},
    {"a codec whose encode returns a number", {encode = function() return 42 end, decode = same}},
    {"a codec with raising metamethods", F.evil {encode = tostring, decode = same}},
  }
end

-- ---- varying arguments ----

--- Every value (and extra[pos], a list of {name, value}) at each argument position, the other
-- arguments from make_args() (a packed list, made anew per call). valid(label, args,
-- ...results) checks a success.
function F.vary(name, fn, make_args, valid, extra)
  for pos = 1, make_args().n do
    local values = F.values()
    for _, v in ipairs(extra and extra[pos] or {}) do values[#values + 1] = v end
    for _, v in ipairs(values) do
      local args = make_args()
      if rawequal(v[2], F.NONE) then
        args.n = pos - 1
      else
        args[pos] = v[2]
      end
      local label = ("%s(#%d = %s)"):format(name, pos, v[1])
      F.check(label, function(l, ...) return valid(l, args, ...) end, fn, table.unpack(args, 1, args.n))
    end
  end
end

--- Every value (and extra[key]) for each key of an options table: the argument at opt_pos, or
-- what opt_pos(args) returns (a nested table such as opts.tls).
function F.vary_options(name, fn, make_args, opt_pos, keys, valid, extra)
  for _, key in ipairs(keys) do
    local values = F.values()
    for _, v in ipairs(extra and extra[key] or {}) do values[#values + 1] = v end
    for _, v in ipairs(values) do
      local args = make_args()
      local opts = type(opt_pos) == "function" and opt_pos(args) or args[opt_pos]
      if not rawequal(v[2], F.NONE) then rawset(opts, key, v[2]) end
      local label = ("%s(%s = %s)"):format(name, key, v[1])
      F.check(label, function(l, ...) return valid(l, args, ...) end, fn, table.unpack(args, 1, args.n))
    end
  end
end

-- ---- rpc.connect: queues the storm's connection consumes itself, so nothing piles up ----

local consumers = setmetatable({}, {__mode = "k"})   -- connection -> queue name -> consumer tag

--- Makes sure conn has the exclusive queue name, consumed with consume_opts (none: not
-- consumed), declaring and consuming again after the connection was replaced (a loss is
-- reported once, by the operation that meets it: a failure is tried again). Returns the
-- consumer tag, or true.
function F.ensure_queue(conn, name, consume_opts)
  local tags = consumers[conn] or {}
  consumers[conn] = tags
  local why
  for _ = 1, 4 do
    local queue, message, count = conn:declare_queue(name, {exclusive = true})
    if queue and not consume_opts then return true end
    if queue and count > 0 and tags[name] then return tags[name] end
    if queue then
      local tag, m, kind = conn:consume(name, consume_opts)
      if tag then
        tags[name] = tag
        return tag
      end
      why = ("consume: %s (%s)"):format(m, kind)
    else
      why = ("declare_queue: %s (%s)"):format(message, F.show(count))
    end
  end
  error("the storm cannot set up its queue " .. name .. ": " .. why, 0)
end

--- The next message conn receives from consumer tag (messages of other consumers, and
-- returned ones, are skipped), waiting at most seconds for each; or nil, message, kind.
function F.next_delivery(conn, tag, seconds)
  for _ = 1, 1000 do
    local m, message, kind = conn:receive(seconds)
    if not m then return nil, message, kind end
    if m.consumer_tag == tag and not m.returned then return m end
  end
  return nil, "1000 other messages came first", "timeout"
end

--- A fresh exclusive queue of conn, consumed with ack = false: publish body to it and receive
-- it. The message, or the first failure (nil, message, kind).
function F.round_trip(conn, body)
  local queue, message, kind = conn:declare_queue("", {exclusive = true})
  if not queue then return nil, message, kind end
  local tag
  tag, message, kind = conn:consume(queue, {ack = false})
  if not tag then return nil, message, kind end
  local ok
  ok, message, kind = conn:publish("", queue, body)
  if not ok then return nil, message, kind end
  return F.next_delivery(conn, tag, 2)
end

--- Whether message m carries what conn:publish was given: body (a string or a number) and
-- the properties table props (read raw; only the values publish takes are compared). Returns
-- true, or false and why.
function F.carries(m, body, props)
  if type(m) ~= "table" or type(m.body) ~= "string" then return false, "a message expected" end
  if (type(body) == "string" or type(body) == "number") and m.body ~= tostring(body) then
    return false, ("body %s, not %s"):format(show(m.body), show(body))
  end
  if type(props) ~= "table" then return true end
  for _, key in ipairs {"content_type", "content_encoding", "correlation_id", "reply_to", "expiration",
                        "message_id", "type", "user_id", "app_id"} do
    local v = rawget(props, key)
    if type(v) == "string" and m[key] ~= v then
      return false, ("property %s is %s, not %s"):format(key, show(m[key]), show(v))
    end
  end
  if rawget(props, "persistent") == true and m.delivery_mode ~= 2 then return false, "not persistent" end
  for _, key in ipairs {"priority", "timestamp"} do
    local v = rawget(props, key)
    if math.type(v) == "integer" and m[key] ~= v then
      return false, ("property %s is %s, not %s"):format(key, show(m[key]), show(v))
    end
  end
  local headers = rawget(props, "headers")
  if type(headers) == "table" then
    if type(m.headers) ~= "table" then return false, "no headers" end
    for k, v in next, headers do
      local got = m.headers[k]
      local same = got == v and math.type(got) == math.type(v) or (v ~= v and got ~= got)
      if not same then return false, ("header %s is %s, not %s"):format(show(k), show(got), show(v)) end
    end
  end
  return true
end

--- Runs body as a coroutine, so that "main thread (normal)" is a coroutine in status normal,
-- and the API is called from a coroutine (its loop and handlers run there).
function F.run(body)
  F.main_thread = coroutine.running()
  F.setup()
  local co = coroutine.create(body)
  local ok, err = coroutine.resume(co)
  if not ok then error(debug.traceback(co, err), 0) end
  assert(coroutine.status(co) == "dead", "the storm yielded")
end

--- After the storm: a normal call still works, on a new client and on the shared one.
function F.finish()
  local c = assert(rpc.client(F.echo_queue, {url = F.URL}))
  F.must("after the storm, a new client:call", F.reply_is("still alive"), c.call, c, "still alive", 5)
  F.must("after the storm, the shared client:call", F.reply_is("again"), F.client.call, F.client, "again",
         5)
  c:close()
  -- and a declare, consume, publish, receive round trip on a new connection
  local conn = assert(rpc.connect {url = F.URL})
  F.must("after the storm, a round trip on a new connection (declare, consume, publish, receive)",
         function(_, m) return F.carries(m, "round trip") end, F.round_trip, conn, "round trip")
  conn:close()
  collectgarbage()
  collectgarbage()
  local counts = {}
  for outcome, n in pairs(tally) do counts[#counts + 1] = ("%s %d"):format(outcome, n) end
  table.sort(counts)
  print(("checked %d outcomes: %d violations (%s)")
    :format(F.checked, F.violations, table.concat(counts, ", ")))
  for _, name in ipairs(leftovers) do print("delete: " .. name) end
  for _, name in ipairs(leftover_exchanges) do print("delete exchange: " .. name) end
  print("DONE")
  io.stdout:flush()
end

return F
