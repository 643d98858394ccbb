-- The whole public API under a storm of values: every Lua type and edge value at every argument
-- position, every option key (client, server, callopts, opts.tls, opts.bind, rpc.connect and the
-- connection's methods, publish properties), self of the wrong type, and handlers, log functions
-- and finalizers that misbehave. Every outcome must be an allowed one,
-- as the README says: a success (of the documented shape), a raised "bad argument ...", or
-- nil, message, kind with a documented kind. Nothing else: no other error, no crash, no hang,
-- and afterwards a normal call still works in the same process, which then exits 0.
--
-- Each storm runs in its own lua5.4 (spec/support/fuzz.lua is its harness), so a segfault fails
-- its spec with the child's output instead of killing busted.
local H = require "support.helpers"

local MAX_REPORT = 8000   -- characters of a failed child's output shown
local LIMIT = 120         -- seconds a storm may take: past it, it is killed as hung

local storms = 0

--- Runs code (Lua, with F = require "support.fuzz" and rpc loaded) in a child lua5.4; fails
-- unless it exits 0 having printed DONE and no VIOLATION line. Deletes the queues it says
-- outlive it. The child writes "at: <call>" to stderr before each call, so a crash or a hang
-- shows where it happened.
local function storm(code)
  storms = storms + 1
  local file = ("%s/api_fuzz%d.lua"):format(H.tmpdir(), storms)
  H.write_file(file, 'local F = require "support.fuzz"\nlocal rpc = require "rpc"\n' .. code .. "\nF.finish()\n")
  local out, status, err = H.run(("timeout -s KILL %d %s %s"):format(LIMIT, H.LUA, H.quote(file)),
                                 {SPEC_AMQP_TOOL = H.AMQP_TOOL})
  local ops = {}
  for name in out:gmatch("\ndelete: ([^\n]*)") do ops[#ops + 1] = {op = "delete", queue = name} end
  local seen = {}
  for name in out:gmatch("\ndelete exchange: ([^\n]*)") do
    if not seen[name] then ops[#ops + 1] = {op = "delete_exchange", exchange = name} end
    seen[name] = true
  end
  if #ops > 0 then pcall(H.amqp, ops) end
  local violations, trace, errors = {}, {}, {}
  for line in out:gmatch("[^\n]+") do
    if line:find("^VIOLATION") then violations[#violations + 1] = line end
  end
  for line in err:gmatch("[^\n]+") do
    if not line:find("^at: ") then
      errors[#errors + 1] = line
    else
      trace[#trace + 1] = line
      if #trace > 3 then table.remove(trace, 1) end
    end
  end
  local summary = out:match("checked %d+ outcomes: [^\n]*") or "no summary"
  if os.getenv("SPEC_FUZZ_VERBOSE") then io.stderr:write(summary, "\n") end
  if status ~= 0 or #violations > 0 or not out:find("\nDONE\n") then
    local stderr = table.move(errors, 1, #errors, #trace + 1, status ~= 0 and trace or {})
    local report = ("child exit status %d%s (%s)\n%s%s"):format(
      status, status == 137 and (", killed after %d s"):format(LIMIT) or "", summary,
      #violations > 0 and table.concat(violations, "\n") or out,
      #stderr > 0 and "\n--- the last calls, then stderr:\n" .. table.concat(stderr, "\n") or "")
    if #report > MAX_REPORT then report = report:sub(1, MAX_REPORT) .. "\n... (cut)" end
    error(report, 2)
  end
  return out
end

describe("the API under a storm of values", function()
  teardown(H.cleanup)

  it("rpc.client: any value at any argument, option or opts.tls key has an allowed outcome", function()
    storm [==[
F.run(function()
  local function new_client(label, _, c) return F.new_client(label, c) end
  local function opts() return {url = F.URL, timeout = 0.5} end
  -- a named reply queue is durable: the ones the values name outlive the process
  for _, name in ipairs {"amqp://", "amqps://", F.URL .. "%00", "a", "a\0b", ("r"):rep(255)} do
    F.leftover(name)
  end
  local function args() return table.pack(F.echo_queue, opts()) end
  F.vary("rpc.client", rpc.client, args, new_client, {
    {{"255-byte queue", ("q"):rep(255)}, {"256-byte queue", ("q"):rep(256)}, {'"q\\0"', "q\0"}},
    {{"valid opts with raising metamethods", F.evil(opts())}},
  })
  F.vary_options("rpc.client", rpc.client, args, 2,
    {"url", "heartbeat", "connect_timeout", "timeout", "reply_to", "confirm", "max_body", "codec", "colour", 1},
    new_client, {
      codec = F.codecs(),
      url = {{"the broker", F.URL}, {"a closed port", "amqp://guest:guest@127.0.0.1:1/"},
             {"no password", "amqp://guest@localhost:1/"}},
      heartbeat = {{"3600", 3600}, {"3601", 3601}},
      connect_timeout = {{"1e-9", 1e-9}, {"0.001", 0.001}, {"1e6", 1e6}, {"1e6 + 1", 1e6 + 1}},
      timeout = {{"1e-9", 1e-9}, {"0.001", 0.001}, {"1e6", 1e6}, {"1e6 + 1", 1e6 + 1}},
      reply_to = {{'"direct"', "direct"}, {'"exclusive"', "exclusive"},
                  {"255-byte name", ("r"):rep(255)}, {"256-byte name", ("r"):rep(256)}},
      max_body = {{"2^31 - 1", (1 << 31) - 1}, {"2^31", 1 << 31}, {"512 MiB", 1 << 29},
                  {"512 MiB + 1", (1 << 29) + 1}},
    })
  local function args_without_url() return table.pack(F.echo_queue, {timeout = 0.5}) end
  F.vary_options("rpc.client", rpc.client, args_without_url, 2, {"urls"}, new_client, {
      urls = {{"{the broker}", {F.URL}}, {"{url, url %00}", {F.URL, F.URL .. "%00"}},
              {"{closed port, the broker}", {"amqp://guest:guest@127.0.0.1:1/", F.URL}},
              {"{the broker, 42}", {F.URL, 42}}, {"64 brokers", F.urls(64)},
              {"65 brokers", F.urls(65)},
              {"{[2] = url}", {[2] = F.URL}}, {"list with raising metamethods", F.evil {F.URL}}},
    })
  -- tls: over amqps:// to the plain AMQP port the handshake fails at once ('tls')
  local function tls_args()
    return table.pack(F.echo_queue, {url = F.AMQPS, connect_timeout = 2, timeout = 0.5, tls = {}})
  end
  F.vary_options("rpc.client", rpc.client, tls_args, 2, {"tls"}, new_client, {
    tls = {{"{verify = false}", {verify = false}}, {"tls with raising metamethods", F.evil()}},
  })
  local function plain_args() return table.pack(F.echo_queue, {url = F.URL, tls = {}}) end
  F.vary_options("rpc.client", rpc.client, plain_args, 2, {"tls"}, new_client)   -- no amqps://
  local function tls_of(args) return args[2].tls end
  F.vary_options("rpc.client tls", rpc.client, tls_args, tls_of,
    {"ca", "cert", "key", "verify", "verify_hostname", "colour"}, new_client, {
      ca = {{"system bundle", "/etc/ssl/certs/ca-certificates.crt"}, {"a directory", "/etc"},
            {"/dev/zero", "/dev/zero"}, {"not PEM", "spec/api_fuzz_spec.lua"}},
      cert = {{"a file without its key", "/etc/ssl/certs/ca-certificates.crt"}},
    })
end)
]==]
  end)

  it("rpc.server: any value at any argument or option has an allowed outcome", function()
    storm [==[
F.run(function()
  local function new_server(label, args, s) return F.new_server(label, s, args) end
  local function opts() return {url = F.URL, auto_delete = true} end
  local function echo(body) return body end
  local function args() return table.pack(F.queue("srv"), echo, opts()) end
  F.vary("rpc.server", rpc.server, args, new_server, {
    {{"255-byte queue", ("q"):rep(254) .. "1"}, {"256-byte queue", ("q"):rep(256)}},
    {{"callable table", setmetatable({}, {__call = echo})}},
    {{"valid opts with raising metamethods", F.evil(opts())}},
  })
  local entries = {}   -- queue arguments: each value as a value, and as a key
  for _, v in ipairs(F.values()) do
    if not rawequal(v[2], F.NONE) then
      entries[#entries + 1] = {"{['x-max-length'] = " .. v[1] .. "}", {["x-max-length"] = v[2]}}
      if v[2] == v[2] and v[2] ~= nil then
        entries[#entries + 1] = {"{[" .. v[1] .. "] = 1}", {[v[2]] = 1}}
      end
    end
  end
  F.vary_options("rpc.server", rpc.server, args, 3,
    {"url", "heartbeat", "connect_timeout", "durable", "exclusive", "arguments", "prefetch", "log",
     "max_body", "reply_to_allow", "codec", "colour", 1},
    new_server, {
      codec = F.codecs(),
      url = {{"the broker", F.URL}, {"a closed port", "amqp://guest:guest@127.0.0.1:1/"}},
      heartbeat = {{"3600", 3600}, {"3601", 3601}},
      connect_timeout = {{"1e-9", 1e-9}, {"1e6", 1e6}, {"1e6 + 1", 1e6 + 1}},
      arguments = entries,
      prefetch = {{"65535", 65535}, {"65536", 65536}},
      max_body = {{"2^31 - 1", (1 << 31) - 1}, {"512 MiB + 1", (1 << 29) + 1}},
      reply_to_allow = {{'"["', "["}, {'"%"', "%"}, {'"("', "("}, {'"a["', "a["}, {'"%b"', "%b"},
                        {'"%f"', "%f"}, {'{".*"}', {".*"}}, {'{".*", 1}', {".*", 1}}, {"{{}}", {{}}},
                        {'{"["}', {"["}}, {"list with raising metamethods", F.evil {".*"}}},
    })
  local function kept_args() return table.pack(F.queue("srv"), echo, {url = F.URL}) end
  F.vary_options("rpc.server", rpc.server, kept_args, 3, {"auto_delete"}, new_server)
  local function args_without_url() return table.pack(F.queue("srv"), echo, {auto_delete = true}) end
  F.vary_options("rpc.server", rpc.server, args_without_url, 3, {"urls"}, new_server, {
    urls = {{"{the broker}", {F.URL}}, {"{closed port, the broker}", {"amqp://guest:guest@127.0.0.1:1/", F.URL}}},
  })
  local function tls_args()
    return table.pack(F.queue("srv"), echo, {url = F.AMQPS, connect_timeout = 2, auto_delete = true, tls = {}})
  end
  F.vary_options("rpc.server", rpc.server, tls_args, 3, {"tls"}, new_server)
  local function tls_of(args) return args[3].tls end
  F.vary_options("rpc.server tls", rpc.server, tls_args, tls_of,
    {"ca", "cert", "key", "verify", "verify_hostname"}, new_server)
end)
]==]
  end)

  it("rpc.server's reply_to_allow serves a named reply queue exactly when an entry is its name or matches all of it", function()
    storm [==[
F.run(function()
  local named = F.queue("named", true)
  local client = assert(rpc.client(F.echo_queue, {url = F.URL, reply_to = named}))
  local patterns = {named, named .. "x", named:sub(1, 10), named:sub(2), "spec%-fuzz%-named%-%x+",
                    ".*", "[", "%", "(", "a[", "s[", "spec-fuzz-(", "%f[%a]", "%bsn.*", "", "\0",
                    F.MiB, {"x", named}, {named, "["}, {"[", named}}
  for _, p in ipairs(patterns) do
    local list = type(p) == "table" and p or {p}
    local want = false
    for _, one in ipairs(list) do
      local ok, i, j = pcall(string.find, named, one)
      want = want or one == named or (ok and i == 1 and j == #named)
    end
    local label = ("rpc.server(reply_to_allow = %s)"):format(F.show(type(p) == "table" and table.concat(p, "|") or p))
    F.check(label, function(_, s)
      local id = client:send("ping", {routing_key = F.queue_of(s)})
      s:poll(5)   -- returns once the request is handled: replied to, or refused
      local stats = s:stats()
      local allowed = stats.replies == 1
      local reply, message, kind
      if allowed then reply, message, kind = client:wait(id, 5) end
      s:close()
      if stats.requests ~= 1 or stats.refused_reply_to + stats.replies ~= 1 then
        return false, ("%d requests, %d replies, %d refused"):format(stats.requests, stats.replies,
                                                                     stats.refused_reply_to)
      elseif want ~= allowed then
        return false, allowed and "allowed, but it should be refused" or "refused, but it should be allowed"
      elseif allowed and reply ~= "ping" then
        return false, ("allowed, but the call got %s (%s)"):format(F.show(message), F.show(kind))
      end
      return true
    end, rpc.server, F.queue("allow"), function(b) return b end,
       {url = F.URL, auto_delete = true, reply_to_allow = p})
  end
  client:close()
end)
]==]
  end)

  it("a queue or reply_to name with a NUL inside is a bad argument or used whole, never cut at the NUL", function()
    storm [==[
F.run(function()
  local function echo(body) return body end
  local base = F.queue("nul")
  local name = base .. "\0tail"
  -- the part before the NUL has a server of its own: nothing meant for name may reach it
  local decoy = assert(rpc.server(base, function() return "decoy" end, {url = F.URL, auto_delete = true}))
  F.check("rpc.server(queue with a NUL)", function(_, s)
    local reply, message, kind = F.client:call("x", 1, {routing_key = name})
    s:close()
    if reply ~= "x" then
      return false, ("a call to the whole name got %s (%s)"):format(F.show(reply or message), F.show(kind))
    end
    return true
  end, rpc.server, name, echo, {url = F.URL, auto_delete = true})
  F.check("rpc.client(queue with a NUL)", function(_, c)
    local reply = c:call("x", 1)
    c:close()
    if reply == "decoy" then return false, "its request went to the queue named by the part before the NUL" end
    return true
  end, rpc.client, name, {url = F.URL})
  local named = F.queue("nul-reply", true)
  F.check("rpc.client(reply_to with a NUL)", function(_, c)
    c:close()
    if F.queue_exists(named) then return false, "it declared the reply queue named by the part before the NUL" end
    return true
  end, rpc.client, F.echo_queue, {url = F.URL, reply_to = named .. "\0x"})
  decoy:close()
end)
]==]
  end)

  it("rpc.serve: any value has an allowed outcome (a run is stopped by SIGTERM)", function()
    storm [==[
F.run(function()
  local serve = F.bounded(rpc.serve)
  local function echo(body) return body end
  local function args() return table.pack(F.queue("serve"), echo, {url = F.URL, auto_delete = true}) end
  local function is_true(l, args, v)
    F.declared(args)
    return F.is_true(l, v)
  end
  F.vary("rpc.serve", serve, args, is_true)
  F.vary_options("rpc.serve", serve, args, 3,
    {"url", "heartbeat", "connect_timeout", "durable", "exclusive", "auto_delete", "arguments", "prefetch",
     "log", "max_body", "reply_to_allow", "tls", "codec", "colour"}, is_true, {codec = F.codecs()})
end)
]==]
  end)

  it("client:call: any self, body, timeout, callopts key or header has an allowed outcome, the echo if a success", function()
    storm [==[
F.run(function()
  local call = F.client_methods.call
  local function args() return table.pack(F.client, "body", 1, {}) end
  --- the echo; with callopts.properties = true, and a table of the reply's properties after it
  local function echoed(l, a, ...)
    local want_props = type(a[4]) == "table" and rawget(a[4], "properties") == true
    local n, props = select("#", ...), select(2, ...)
    if want_props and (n ~= 2 or type(props) ~= "table") then return false, "the reply and its properties expected" end
    if not want_props and n ~= 1 then return false, "the reply alone expected" end
    return F.reply_is(F.echo_of(a[2]))(l, ...)
  end
  F.vary("client:call", call, args, echoed, {
    {{"the client", F.client}, {"a server", F.echo}},
    {{"2 MiB body", F.MiB .. F.MiB}},
    {{"1e-9", 1e-9}, {"5e-324", 5e-324}, {"0.001", 0.001}, {"1e6", 1e6}, {"1e6 + 1", 1e6 + 1}},
    {{"valid callopts with raising metamethods", F.evil {persistent = true}}},
  })
  local headers = {}   -- each value as a header value, and as a header key
  for _, v in ipairs(F.values()) do
    if not rawequal(v[2], F.NONE) then
      headers[#headers + 1] = {"{k = " .. v[1] .. "}", {k = v[2]}}
      if v[2] == v[2] and v[2] ~= nil then
        headers[#headers + 1] = {"{[" .. v[1] .. "] = 'x'}", {[v[2]] = "x"}}
      end
    end
  end
  headers[#headers + 1] = {"255-byte key", {[("k"):rep(255)] = 1}}
  headers[#headers + 1] = {"256-byte key", {[("k"):rep(256)] = 1}}
  headers[#headers + 1] = {"100 KiB of headers", {big = ("h"):rep(100 * 1024)}}
  headers[#headers + 1] = {"headers with raising metamethods", F.evil {k = "v"}}
  F.vary_options("client:call", call, args, 4,
    {"content_type", "headers", "persistent", "priority", "exchange", "routing_key", "timeout", "properties", "colour",
     1},
    echoed, {
      headers = headers,
      priority = {{"255", 255}, {"256", 256}},
      exchange = {{'"amq.direct"', "amq.direct"}, {"255 bytes", ("e"):rep(255)}, {"256 bytes", ("e"):rep(256)}},
      routing_key = {{"the echo queue", F.echo_queue}, {"255 bytes", ("k"):rep(255)},
                     {"256 bytes", ("k"):rep(256)}},
      content_type = {{"255 bytes", ("c"):rep(255)}, {"256 bytes", ("c"):rep(256)}},
    })
  -- a json client (opts.codec): any value as the body is encoded or a bad argument; the echo
  -- comes back decoded (a string as it was sent)
  local json = assert(rpc.client(F.echo_queue, {url = F.URL, timeout = 2, codec = "json"}))
  local function json_args() return table.pack(json, "body", 1, {}) end
  local function decoded(_, a, reply, ...)
    local want_props = type(a[4]) == "table" and rawget(a[4], "properties") == true
    if reply == nil or select("#", ...) ~= (want_props and 1 or 0) then return false, "one decoded reply expected" end
    if want_props and type((...)) ~= "table" then return false, "a properties table expected" end
    if type(a[2]) == "string" and reply ~= a[2] then return false, "expected the echo " .. F.show(a[2]) end
    return true
  end
  F.vary("client:call (codec json)", call, json_args, decoded, {nil, {{"a nested table", {a = {b = {1, 2, "c"}}}}}})
  F.vary_options("client:call (codec json)", call, json_args, 4, {"content_type", "properties"}, decoded)
  json:close()
end)
]==]
  end)

  it("client:send: any value has an allowed outcome, an id whose wait gets the echo if a success", function()
    storm [==[
F.run(function()
  local send = F.client_methods.send
  local function args() return table.pack(F.client, "body", {}) end
  local function sent(l, a, id, ...)
    if type(id) ~= "string" or #id ~= 36 or not id:find("^%x+%-%x+%-%x+%-%x+%-%x+$") or select("#", ...) > 0 then
      return false, "one uuid expected"
    end
    local want_props = type(a[3]) == "table" and rawget(a[3], "properties") == true
    F.check(l .. " then :wait", function(l2, reply, ...)
      local n, props = select("#", ...), ...
      if want_props and (n ~= 1 or type(props) ~= "table") then return false, "the reply and its properties expected" end
      if not want_props and n ~= 0 then return false, "the reply alone expected" end
      return F.reply_is(F.echo_of(a[2]))(l2, reply)
    end, a[1].wait, a[1], id, 2)
    return true
  end
  F.vary("client:send", send, args, sent, {nil, {{"2 MiB body", F.MiB .. F.MiB}}})
  F.vary_options("client:send", send, args, 3,
    {"content_type", "headers", "persistent", "priority", "exchange", "routing_key", "timeout", "properties", "colour"},
    sent, {
      timeout = {{"1e-9", 1e-9}, {"0.001", 0.001}, {"1e6", 1e6}, {"1e6 + 1", 1e6 + 1}},
    })
end)
]==]
  end)

  it("client:wait: any self, id or timeout has an allowed outcome", function()
    storm [==[
F.run(function()
  local wait = F.client_methods.wait
  local function args() return table.pack(F.client, F.client:send("w"), 2) end
  local function replied(l, _, ...) return F.reply_is("w")(l, ...) end
  local waited = F.client:send("w")
  F.client:wait(waited)
  local upper = F.client:send("w")
  F.vary("client:wait", wait, args, replied, {
    nil,
    {{"an id already waited for", waited}, {"an id in upper case", upper:upper()},
     {"a uuid never sent", "01234567-89ab-cdef-0123-456789abcdef"},
     {"another client's id", F.open_client():send("w")},
     {"nil uuid", "00000000-0000-0000-0000-000000000000"},
     {"36 x", ("x"):rep(36)}, {"an id and a NUL", F.client:send("w") .. "\0"},
     {"an id with a NUL inside", (F.client:send("w"):gsub("^.", "\0"))}},
    {{"1e-9", 1e-9}, {"1e6", 1e6}, {"1e6 + 1", 1e6 + 1}},
  })
  -- the same id waited twice: the second raises, whatever the first got
  local id = F.client:send("twice")
  F.check("client:wait(id)", F.any, wait, F.client, id, 2)
  F.check("client:wait(id) again", function() return false, "a bad argument expected" end, wait, F.client, id, 2)
end)
]==]
  end)

  it("client:call_all: any value, as the list or in it, has an allowed outcome, the echoes in order if a success", function()
    storm [==[
F.run(function()
  local call_all = F.client_methods.call_all
  local function args() return table.pack(F.client, {"a", "b"}, 2, {}) end
  local function echoed(l, a, replies)
    if type(replies) ~= "table" then return false, "a table expected" end
    local n = type(a[2]) == "table" and rawlen(a[2]) or 0
    if #replies ~= n then return false, ("%d replies for %d bodies"):format(#replies, n) end
    for i = 1, n do
      local want = F.echo_of(rawget(a[2], i))
      if replies[i] ~= want then
        return false, ("reply %d is %s, not %s"):format(i, F.show(replies[i]), F.show(want))
      end
    end
    return true
  end
  local thousand = {}
  for i = 1, 1000 do thousand[i] = i end
  local lists = {{"{}", {}}, {"{1, nil, 3}", {1, nil, 3}}, {"1000 bodies", thousand},
                 {"list with raising metamethods", F.evil {"a", "b"}}, {"{1 MiB, 1 MiB}", {F.MiB, F.MiB}}}
  for _, v in ipairs(F.values()) do
    if not rawequal(v[2], F.NONE) then lists[#lists + 1] = {"{" .. v[1] .. "}", {v[2]}} end
    if not rawequal(v[2], F.NONE) then lists[#lists + 1] = {"{'a', " .. v[1] .. "}", {"a", v[2]}} end
  end
  F.vary("client:call_all", call_all, args, echoed, {
    nil, lists, {{"1e-9", 1e-9}, {"1e6", 1e6}, {"1e6 + 1", 1e6 + 1}},
  })
  F.vary_options("client:call_all", call_all, args, 4,
    {"content_type", "headers", "persistent", "priority", "exchange", "routing_key", "timeout", "properties", "colour"},
    echoed)
end)
]==]
  end)

  it("client:stats, close, __tostring, __close, __gc: any self or extra argument has an allowed outcome", function()
    storm [==[
F.run(function()
  local function ignore_args(valid) return function(l, _, ...) return valid(l, ...) end end
  local function args() return table.pack(F.open_client(), nil) end
  F.vary("client:stats", F.client_methods.stats, args, ignore_args(F.table_of_counts))
  F.vary("client:close", F.client_methods.close, args, ignore_args(F.nothing))
  F.vary("client.__tostring", F.client_meta.__tostring, args, ignore_args(F.tostring_result))
  F.vary("client.__close", F.client_meta.__close, args, ignore_args(F.nothing))
  F.vary("client.__gc", F.client_meta.__gc, args, ignore_args(F.nothing))
end)
]==]
  end)

  it("server:run and server:poll: any self or timeout has an allowed outcome", function()
    storm [==[
F.run(function()
  local function ignore_args(valid) return function(l, _, ...) return valid(l, ...) end end
  local run = F.bounded(F.server_methods.run)
  local function run_args() return table.pack(F.open_server(), nil) end
  F.vary("server:run", run, run_args, ignore_args(F.is_true))
  -- a request is waiting for F.echo before each poll, so that a valid timeout returns at once
  local function poll_args()
    F.client:send("p")
    return table.pack(F.echo, 0)
  end
  F.vary("server:poll", F.server_methods.poll, poll_args, ignore_args(F.count),
    {nil, {{"1e-9", 1e-9}, {"1e6", 1e6}, {"1e6 + 1", 1e6 + 1}}})
end)
]==]
  end)

  it("server:stop, close, stats, __tostring, __close, __gc: any self or extra argument has an allowed outcome", function()
    storm [==[
F.run(function()
  local function ignore_args(valid) return function(l, _, ...) return valid(l, ...) end end
  local function args() return table.pack(F.open_server(), nil) end
  F.vary("server:stop", F.server_methods.stop, args, ignore_args(F.nothing))
  F.vary("server:stats", F.server_methods.stats, args, ignore_args(F.table_of_counts))
  F.vary("server:close", F.server_methods.close, args, ignore_args(F.nothing))
  F.vary("server.__tostring", F.server_meta.__tostring, args, ignore_args(F.tostring_result))
  F.vary("server.__close", F.server_meta.__close, args, ignore_args(F.nothing))
  F.vary("server.__gc", F.server_meta.__gc, args, ignore_args(F.nothing))
  -- a stopped server that is not running: the next run still runs (and is stopped as usual)
  local s = F.open_server()
  s:stop()
  F.check("server:run() after a stop() outside run", F.is_true, F.bounded(s.run), s)
end)
]==]
  end)

  it("a handler that raises any value, yields or returns a non-string gets its caller 'remote'; its server serves on", function()
    storm [==[
local function tostring_raises()
  return setmetatable({}, {__tostring = function() error("EVIL __tostring") end})
end
local function tostring_raises_itself()
  local t
  t = setmetatable({}, {__tostring = function() error(t) end})
  return t
end
local server
local bad = {   -- body -> what the handler does
  ["error(nil)"] = function() error(nil) end,
  ["error({})"] = function() error({}) end,
  ["error(table whose __tostring raises)"] = function() error(tostring_raises()) end,
  ["error(table whose __tostring raises it)"] = function() error(tostring_raises_itself()) end,
  ["error(table whose __tostring returns a table)"] = function()
    error(setmetatable({}, {__tostring = function() return {} end}))
  end,
  ["error(table whose __tostring yields)"] = function()
    error(setmetatable({}, {__tostring = coroutine.yield}))
  end,
  ["error(table with raising metamethods)"] = function() error(F.evil()) end,
  ["error(42)"] = function() error(42) end,
  ["error(true)"] = function() error(true) end,
  ["error(function)"] = function() error(print) end,
  ["error(coroutine)"] = function() error(coroutine.create(print)) end,
  ["error(io.stdout)"] = function() error(io.stdout) end,
  ["error(a client)"] = function() error(F.client) end,
  ["error(1 MiB string)"] = function() error(F.MiB) end,
  ["error('a\\0b')"] = function() error("a\0b") end,
  ["error('x', 0)"] = function() error("x", 0) end,
  ["coroutine.yield()"] = function() coroutine.yield("y") end,
  ["stack overflow"] = function() local function f() return 1 + f() end return f() end,
  ["string.rep too large"] = function() return string.rep("x", 1 << 62) end,
  ["return nothing"] = function() end,
  ["return nil, 'x'"] = function() return nil, "x" end,
  ["return {}"] = function() return {} end,
  ["return true"] = function() return true end,
  ["return table with raising metamethods"] = function() return F.evil() end,
  ["return a function"] = function() return print end,
  ["server:poll(0) inside its own handler"] = function() return server:poll(0) end,
  ["server:run() inside its own handler"] = function() return server:run() end,
  -- a table as the second value is reply properties: a bad one is a handler error
  ["return 'x', {colour = 'red'}"] = function() return "x", {colour = "red"} end,
  ["return 'x', {content_type = 5}"] = function() return "x", {content_type = 5} end,
  ["return 'x', {headers = {f = print}}"] = function() return "x", {headers = {f = print}} end,
  ["return 'x', {[table whose __tostring raises] = 1}"] = function() return "x", {[tostring_raises()] = 1} end,
  ["return 'x', {headers = {['x-rpc-error'] = 'fake'}}"] = function()
    return "x", {headers = {["x-rpc-error"] = "fake"}}
  end,
}
local good = {   -- body -> handler, and the reply
  ["return 0/0"] = {function() return 0 / 0 end},
  ["return math.huge"] = {function() return math.huge end, "inf"},
  ["return 2^63"] = {function() return 2 ^ 63 end, tostring(2 ^ 63)},
  ["return 1 MiB"] = {function() return F.MiB end, F.MiB},
  ["return '', 'extra'"] = {function() return "", "extra" end, ""},
  -- any other second value than a table is ignored, as before reply properties
  ["return body:gsub('a', 'b')"] = {function(body) return body:gsub("a", "b") end,
                                    (("return body:gsub('a', 'b')"):gsub("a", "b"))},
  ["return 'x', true"] = {function() return "x", true end, "x"},
  ["return 'x', 42"] = {function() return "x", 42 end, "x"},
  ["return 'x', print"] = {function() return "x", print end, "x"},
  ["return 'x', nil"] = {function() return "x", nil end, "x"},
  ["return 'x', {content_type = 'text/plain'}"] = {function() return "x", {content_type = "text/plain"} end, "x"},
  ["return 'x', table with raising metamethods (read raw: no properties)"] = {function() return "x", F.evil() end, "x"},
  ["collectgarbage()"] = {function() collectgarbage() return "gc" end, "gc"},
  ["call another service through the waiting client"] = {
    function() return (F.client:call("inner", 2)) end, "inner"},
}
local over_max_body = "return 16 MiB + 1"   -- the server's default max_body is 16 MiB
local queue = F.queue("handlers")
local function handler(body)
  if body == over_max_body then return ("r"):rep((16 << 20) + 1) end
  if bad[body] then return bad[body]() end
  if good[body] then return good[body][1](body) end
  return body
end

local function storm()
  local errors = server:stats().errors
  for body in pairs(bad) do
    local label = "handler doing " .. body
    local outcome = F.check(label, function() return false, "nil, message, 'remote' expected" end,
                            F.client.call, F.client, body, 5, {routing_key = queue})
    if outcome ~= "remote" and outcome ~= "violation" then
      F.violation(label, "got " .. outcome .. ", not remote")
    end
    F.must(label .. ", then an echo", F.reply_is("echo"), F.client.call, F.client, "echo", 5,
           {routing_key = queue})
  end
  for body, case in pairs(good) do
    F.must("handler doing " .. body, F.reply_is(case[2]), F.client.call, F.client, body, 5, {routing_key = queue})
  end
  local stats = server:stats()
  local n = 0
  for _ in pairs(bad) do n = n + 1 end
  if stats.errors - errors ~= n then
    F.violation("server:stats().errors", ("%d errors for %d bad handlers"):format(stats.errors - errors, n))
  end
  if type(stats.last_error) ~= "string" then F.violation("server:stats().last_error", "not a string") end
  local outcome = F.check("handler doing " .. over_max_body, function() return false, "'too_large' expected" end,
                          F.client.call, F.client, over_max_body, 10, {routing_key = queue})
  if outcome ~= "too_large" and outcome ~= "violation" then
    F.violation("handler doing " .. over_max_body, "got " .. outcome .. ", not too_large")
  end
end

F.run(function()
  server = assert(rpc.server(queue, handler, {url = F.URL, auto_delete = true}))
  storm()   -- the caller in a coroutine
end)
storm()     -- the caller on the main thread

-- a handler that closes the client waiting on it: that call ends 'closed'
local victim = assert(rpc.client(queue, {url = F.URL}))
bad["close the waiting client"] = function() victim:close() return "closed" end
F.check("handler closing the client that waits", F.any, victim.call, victim, "close the waiting client", 5)
-- a handler that closes its own server: the reply still goes out, then the server is closed
local closing
closing = assert(rpc.server(F.queue("closing"), function() closing:close() return "bye" end,
                            {url = F.URL, auto_delete = true}))
F.must("handler closing its own server", F.reply_is("bye"), F.client.call, F.client, "x", 5,
       {routing_key = F.queue_of(closing)})
if not tostring(closing):find("closed") then F.violation("a server closed by its handler", "still open") end
server:close()
]==]
  end)

  it("a __gc that calls the client during its call or call_all changes none of their requests and costs no connection", function()
    storm [==[
-- Garbage whose finalizer, once armed, calls the client on its k-th run; with a whole GC cycle
-- at every allocation check, k walks the finalizer through every point of the outer call.
F.run(function()
  local queue = F.queue("gc")
  local server = assert(rpc.server(queue, function(body, request)
    return body .. "|" .. tostring(request.headers and request.headers.tag)
  end, {url = F.URL, auto_delete = true}))
  local client = assert(rpc.client(queue, {url = F.URL, timeout = 5}))
  local arm, nested
  local mt = {}
  mt.__gc = function()
    if arm then
      arm = arm - 1
      if arm <= 0 then
        arm = nil
        local reply, message, kind = client:call("inner", 0.2, {headers = {tag = ("in"):rep(20)}})
        nested = {reply, message, kind}
      end
    end
    setmetatable({}, mt)   -- always one more: a finalizer at every GC cycle
  end
  setmetatable({}, mt)

  local function replies_are(bodies)
    return function(_, replies)
      for i, body in ipairs(bodies) do
        local want = tostring(body) .. "|outer"
        if type(replies) ~= "table" or replies[i] ~= want then
          local got = type(replies) == "table" and replies[i]
          return false, ("reply %d is %s, not %s"):format(i, F.show(got), F.show(want))
        end
      end
      return true
    end
  end

  local big = ("b"):rep(100000)
  local cases = {
    call_all = function(bodies, opts) return client:call_all(bodies, 5, opts) end,
    call = function(bodies, opts) return {client:call(bodies[3], 5, opts)} end,
  }
  for _, mode in ipairs {"incremental", "generational"} do
    for k = 1, 14 do
      for _, case in ipairs {"call_all", "call"} do
        if mode == "incremental" then
          collectgarbage("incremental", 1, 1000, 30)   -- pause ~0, a whole cycle per step
        else
          collectgarbage("generational", 1, 100)       -- a young collection every 1 % of growth
        end
        collectgarbage("stop")
        local bodies, opts = {1, 2, big, 4}, {headers = {tag = "outer"}}
        arm, nested = k, nil
        collectgarbage("restart")
        local label = ("client:%s with a finalizer calling the client at its GC check %d (%s GC)")
          :format(case, k, mode)
        F.must(label, replies_are(case == "call" and {big} or bodies), cases[case], bodies, opts)
        arm = nil
        collectgarbage("incremental", 200, 100, 13)
        if nested and nested[3] == "connection" then
          F.violation(label, "the finalizer's own call cost the connection: " .. F.show(nested[2]))
        end
      end
    end
  end
  server:close()
  client:close()
end)
]==]
  end)

  it("a log function that raises any value, yields or calls a client never stops its server reconnecting and serving", function()
    storm [==[
local logs = {
  ["raises"] = function() error("EVIL log") end,
  ["raises a table"] = function() error({}) end,
  ["raises nil"] = function() error(nil) end,
  ["raises a table whose __tostring raises"] = function()
    error(setmetatable({}, {__tostring = function() error("EVIL") end}))
  end,
  ["yields"] = function() coroutine.yield() end,
  ["calls a client"] = function() return F.client:call("from log", 1) end,
  ["closes the client that waits"] = function() F.other:close() end,
}
F.run(function()
  local servers, deletes = {}, {}
  for name, log in pairs(logs) do
    local s = {name = name, calls = 0, queue = F.queue("log")}
    local function counted(line)
      s.calls = s.calls + 1
      return log(line)
    end
    s.server = assert(rpc.server(s.queue, function(b) return b end, {url = F.URL, auto_delete = true, log = counted}))
    servers[#servers + 1] = s
    deletes[#deletes + 1] = ('{"op": "delete", "queue": "%s"}'):format(s.queue)
  end
  -- the broker cancels each consumer: every server loses its connection, logs, reconnects, logs
  assert(os.execute(("/usr/bin/python3 %s ops '[%s]' > /dev/null"):format(F.TOOL, table.concat(deletes, ", "))))
  for _, s in ipairs(servers) do
    local deadline, reply = os.time() + 15, nil
    repeat
      local client = F.open_client()
      F.check("a call to the server whose log " .. s.name, F.any, client.call, client, "back", 0.5,
              {routing_key = s.queue})
      reply = F.client:call("back", 0.5, {routing_key = s.queue})
    until reply == "back" or os.time() > deadline
    if reply ~= "back" then F.violation("the server whose log " .. s.name, "did not serve again within 15 s") end
    if s.calls < 2 then
      F.violation("the server whose log " .. s.name, ("log called %d times, 2 expected"):format(s.calls))
    end
    if s.server:stats().reconnects < 1 then
      F.violation("the server whose log " .. s.name, "no reconnect counted")
    end
    s.server:close()
  end
end)
]==]
  end)
end)

describe("rpc.connect and its connection under a storm of values", function()
  teardown(H.cleanup)

  it("rpc.connect: any value as opts, or at any option or opts.tls key, has an allowed outcome", function()
    storm [==[
F.run(function()
  local function new_connection(label, _, c)
    if not F.is(c, "rpc.connection") then return false, "an rpc.connection expected" end
    F.check(label .. " then a round trip", function(_, m) return F.carries(m, "ping") end, F.round_trip, c, "ping")
    c:close()
    return true
  end
  local function opts() return {url = F.URL, connect_timeout = 2} end
  local function args() return table.pack(opts()) end
  F.vary("rpc.connect", rpc.connect, args, new_connection,
         {{{"valid opts with raising metamethods", F.evil(opts())}}})
  F.vary_options("rpc.connect", rpc.connect, args, 1,
    {"url", "heartbeat", "connect_timeout", "max_body", "colour", 1}, new_connection, {
      url = {{"the broker", F.URL}, {"a closed port", "amqp://guest:guest@127.0.0.1:1/"},
             {"no password", "amqp://guest@localhost:1/"}},
      heartbeat = {{"3600", 3600}, {"3601", 3601}},
      connect_timeout = {{"1e-9", 1e-9}, {"0.001", 0.001}, {"1e6", 1e6}, {"1e6 + 1", 1e6 + 1}},
      max_body = {{"3", 3}, {"4", 4}, {"512 MiB", 1 << 29}, {"512 MiB + 1", (1 << 29) + 1}},
    })
  local function args_without_url() return table.pack({connect_timeout = 2}) end
  F.vary_options("rpc.connect", rpc.connect, args_without_url, 1, {"urls"}, new_connection, {
    urls = {{"{the broker}", {F.URL}}, {"{closed port, the broker}", {"amqp://guest:guest@127.0.0.1:1/", F.URL}},
            {"{the broker, 42}", {F.URL, 42}}, {"64 brokers", F.urls(64)}, {"65 brokers", F.urls(65)},
            {"list with raising metamethods", F.evil {F.URL}}},
  })
  local function tls_args() return table.pack({url = F.AMQPS, connect_timeout = 2, tls = {}}) end
  F.vary_options("rpc.connect", rpc.connect, tls_args, 1, {"tls"}, new_connection, {
    tls = {{"{verify = false}", {verify = false}}, {"tls with raising metamethods", F.evil()}},
  })
  local function plain_args() return table.pack({url = F.URL, tls = {}}) end
  F.vary_options("rpc.connect", rpc.connect, plain_args, 1, {"tls"}, new_connection)
  local function tls_of(args) return args[1].tls end
  F.vary_options("rpc.connect tls", rpc.connect, tls_args, tls_of,
    {"ca", "cert", "key", "verify", "verify_hostname", "colour"}, new_connection, {
      ca = {{"system bundle", "/etc/ssl/certs/ca-certificates.crt"}, {"a directory", "/etc"}},
    })
end)
]==]
  end)

  it("conn:declare_*, bind, unbind, purge, delete_*: any self, argument or option has an allowed outcome", function()
    storm [==[
F.run(function()
  local conn = F.open_connection()
  local selves = {{"the client", F.client}, {"a server", F.echo}, {"a number", 42},
                  {"a table with rpc.connection's metatable", setmetatable({}, F.connection_meta)}}
  local names = {{"255-byte name", ("n"):rep(255)}, {"256-byte name", ("n"):rep(256)}}
  --- every value in a table, as the value of key and as a key
  local function entries(key)
    local list = {}
    for _, v in ipairs(F.values()) do
      if not rawequal(v[2], F.NONE) then
        list[#list + 1] = {("{[%q] = %s}"):format(key, v[1]), {[key] = v[2]}}
        if v[2] == v[2] and v[2] ~= nil then list[#list + 1] = {"{[" .. v[1] .. "] = 1}", {[v[2]] = 1}} end
      end
    end
    list[#list + 1] = {"table with raising metamethods", F.evil {[key] = 1}}
    return list
  end
  local function short(v) return type(v) == "string" and #v <= 255 end

  -- declare_exchange: what it declares under a name of the storm's values is deleted after it
  local function declared_exchange(l, a, ...)
    if short(a[2]) then F.leftover_exchange(a[2]) end
    return F.is_true(l, ...)
  end
  local function exchange_args()
    return table.pack(F.open_connection(), F.exchange("de"), "direct", {auto_delete = true})
  end
  F.vary("conn:declare_exchange", F.connection_methods.declare_exchange, exchange_args, declared_exchange, {
    selves, names,
    {{'"fanout"', "fanout"}, {'"topic"', "topic"}, {'"headers"', "headers"}, {'"x-custom"', "x-custom"},
     {'"Direct"', "Direct"}},
  })
  F.vary_options("conn:declare_exchange", F.connection_methods.declare_exchange, exchange_args, 4,
    {"durable", "auto_delete", "internal", "passive", "arguments", "colour", 1}, declared_exchange,
    {arguments = entries("alternate-exchange")})

  -- declare_queue: name, messages, consumers; what is not exclusive is deleted after it
  local function declared_queue(_, a, name, messages, count, ...)
    if type(name) ~= "string" or math.type(messages) ~= "integer" or math.type(count) ~= "integer"
       or messages < 0 or count < 0 or select("#", ...) > 0 then
      return false, "name, messages, consumers expected"
    end
    if type(a[3]) ~= "table" or rawget(a[3], "exclusive") ~= true then F.leftover(name) end
    return true
  end
  local function queue_args() return table.pack(F.open_connection(), F.queue("dq", true), {exclusive = true}) end
  F.vary("conn:declare_queue", F.connection_methods.declare_queue, queue_args, declared_queue, {selves, names})
  F.vary_options("conn:declare_queue", F.connection_methods.declare_queue, queue_args, 3,
    {"durable", "exclusive", "auto_delete", "passive", "arguments", "colour", 1}, declared_queue,
    {arguments = entries("x-max-length")})

  -- bind and unbind: an exclusive queue of the connection and amq.direct
  local bq = F.queue("bq")
  local function bind_args()
    local c = F.open_connection()
    F.ensure_queue(c, bq)
    return table.pack(c, bq, "amq.direct", "fuzz-key", nil)
  end
  local function ignore_args(valid) return function(l, _, ...) return valid(l, ...) end end
  for _, method in ipairs {"bind", "unbind"} do
    F.vary("conn:" .. method, F.connection_methods[method], bind_args, ignore_args(F.is_true), {
      selves, names, names, names, entries("x-match"),
    })
  end

  -- purge, delete_queue (a fresh exclusive queue each time) and delete_exchange (a fresh one)
  local pq = F.queue("pq")
  local function purge_args()
    local c = F.open_connection()
    F.ensure_queue(c, pq)
    return table.pack(c, pq)
  end
  F.vary("conn:purge", F.connection_methods.purge, purge_args, ignore_args(F.count), {selves, names})
  local function delete_queue_args()
    local c = F.open_connection()
    local name = F.queue("delq")
    F.ensure_queue(c, name)
    return table.pack(c, name, {})
  end
  F.vary("conn:delete_queue", F.connection_methods.delete_queue, delete_queue_args, ignore_args(F.count),
         {selves, names})
  F.vary_options("conn:delete_queue", F.connection_methods.delete_queue, delete_queue_args, 3,
                 {"if_unused", "if_empty", "colour", 1}, ignore_args(F.count))
  local function delete_exchange_args()
    local c = F.open_connection()
    local name = F.exchange("delx")
    for _ = 1, 3 do if c:declare_exchange(name, "fanout") then break end end
    return table.pack(c, name, {})
  end
  F.vary("conn:delete_exchange", F.connection_methods.delete_exchange, delete_exchange_args,
         ignore_args(F.is_true), {selves, names})
  F.vary_options("conn:delete_exchange", F.connection_methods.delete_exchange, delete_exchange_args, 3,
                 {"if_unused", "colour", 1}, ignore_args(F.is_true))
end)
]==]
  end)

  it("conn:publish, consume, cancel, receive: any value has an allowed outcome; a message arrives as published", function()
    storm [==[
F.run(function()
  local selves = {{"the client", F.client}, {"a server", F.echo}, {"a number", 42},
                  {"a table with rpc.connection's metatable", setmetatable({}, F.connection_meta)}}
  local names = {{"255-byte name", ("n"):rep(255)}, {"256-byte name", ("n"):rep(256)}}
  local function ignore_args(valid) return function(l, _, ...) return valid(l, ...) end end
  local sink = F.queue("sink")   -- consumed with ack = false by the connection that publishes to it

  -- publish: a message to the sink must arrive with its body and properties; one the broker
  -- refuses (a user_id not the connection's, a malformed expiration) fails the receive after it
  local sink_tag
  local function publish_args()
    local c = F.open_connection()
    sink_tag = F.ensure_queue(c, sink, {ack = false, prefetch = 0})
    return table.pack(c, "", sink, "body", {}, false)
  end
  local function published(l, a, ...)
    local ok, why = F.is_true(l, ...)
    if not ok then return false, why end
    if a[2] ~= "" or a[3] ~= sink then return true end
    local outcome, m = F.check(l .. " then :receive it", F.any, F.next_delivery, a[1], sink_tag, 2)
    if outcome == "ok" then return F.carries(m, a[4], a[5]) end
    if outcome == "timeout" then return false, "the message did not arrive within 2 s" end
    return true
  end
  F.vary("conn:publish", F.connection_methods.publish, publish_args, published, {
    selves, {{'"amq.direct"', "amq.direct"}, names[1], names[2]}, names,
    {{"2 MiB body", F.MiB .. F.MiB}, {"every byte", (function()
      local t = {}
      for i = 0, 255 do t[#t + 1] = string.char(i) end
      return table.concat(t)
    end)()}},
    {{"valid properties with raising metamethods", F.evil {content_type = "x"}}},
  })
  local headers = {}   -- each value as a header value, and as a header key
  for _, v in ipairs(F.values()) do
    if not rawequal(v[2], F.NONE) then
      headers[#headers + 1] = {"{k = " .. v[1] .. "}", {k = v[2]}}
      if v[2] == v[2] and v[2] ~= nil then headers[#headers + 1] = {"{[" .. v[1] .. "] = 'x'}", {[v[2]] = "x"}} end
    end
  end
  headers[#headers + 1] = {"255-byte key", {[("k"):rep(255)] = 1}}
  headers[#headers + 1] = {"256-byte key", {[("k"):rep(256)] = 1}}
  headers[#headers + 1] = {"100 KiB of headers", {big = ("h"):rep(100 * 1024)}}
  headers[#headers + 1] = {"headers with raising metamethods", F.evil {k = "v"}}
  local short = {{"255 bytes", ("p"):rep(255)}, {"256 bytes", ("p"):rep(256)}, {'"p\\0q"', "p\0q"}}
  F.vary_options("conn:publish", F.connection_methods.publish, publish_args, 5,
    {"content_type", "content_encoding", "headers", "persistent", "priority", "correlation_id", "reply_to",
     "expiration", "message_id", "timestamp", "type", "user_id", "app_id", "colour", 1}, published, {
      content_type = short, content_encoding = short, correlation_id = short, reply_to = short,
      message_id = short, type = short, app_id = short,
      headers = headers,
      priority = {{"255", 255}, {"256", 256}},
      expiration = {{'"60000"', "60000"}, {'"0"', "0"}, {'"-1"', "-1"}, {'"x"', "x"}, short[1]},
      timestamp = {{"1700000000", 1700000000}},
      user_id = {{'"guest"', "guest"}, short[1], short[2]},
    })

  -- consume: a consumer of an exclusive queue, cancelled by the tag it returned
  local cq = F.queue("cq")
  local function consume_args()
    local c = F.open_connection()
    F.ensure_queue(c, cq)
    return table.pack(c, cq, {ack = false})
  end
  local function consumed(l, a, tag, ...)
    if type(tag) ~= "string" or select("#", ...) > 0 then return false, "one consumer tag expected" end
    F.must(l .. " then :cancel(the tag it returned)", F.is_true, a[1].cancel, a[1], tag)
    return true
  end
  F.vary("conn:consume", F.connection_methods.consume, consume_args, consumed, {selves, names})
  F.vary_options("conn:consume", F.connection_methods.consume, consume_args, 3,
    {"ack", "prefetch", "exclusive", "tag", "colour", 1}, consumed, {
      prefetch = {{"65535", 65535}, {"65536", 65536}},
      tag = {names[1], names[2], {"a tag in use", F.ensure_queue(F.open_connection(), F.queue("busy"), {ack = false})}},
    })

  -- cancel: a consumer made for it
  local function cancel_args()
    local c = F.open_connection()
    F.ensure_queue(c, cq)
    return table.pack(c, (assert(c:consume(cq, {ack = false}))))
  end
  F.vary("conn:cancel", F.connection_methods.cancel, cancel_args, ignore_args(F.is_true), {selves, names})

  -- receive: a message is published to the sink before each, so that no valid timeout waits long
  local function receive_args()
    local c = F.open_connection()
    F.ensure_queue(c, sink, {ack = false, prefetch = 0})
    assert(c:publish("", sink, "r"))
    return table.pack(c, 2)
  end
  local function received(_, _, m, ...)
    if type(m) ~= "table" or type(m.body) ~= "string" or select("#", ...) > 0 then
      return false, "one message expected"
    end
    if m.body ~= "r" then return false, "not a message published to the sink: " .. F.show(m.body) end
    return true
  end
  F.vary("conn:receive", F.connection_methods.receive, receive_args, received, {
    selves, {{"1e-9", 1e-9}, {"0.001", 0.001}, {"1e6", 1e6}, {"1e6 + 1", 1e6 + 1}, {"5e-324", 5e-324}},
  })
end)
]==]
  end)

  it("conn:ack, nack, reject, close and metamethods: any value is allowed; a closed connection says 'closed'", function()
    storm [==[
F.run(function()
  local selves = {{"the client", F.client}, {"a server", F.echo}, {"a number", 42},
                  {"a table with rpc.connection's metatable", setmetatable({}, F.connection_meta)}}
  local function ignore_args(valid) return function(l, _, ...) return valid(l, ...) end end
  -- a delivery of a consumer with manual acks, received for each call
  local mq = F.queue("manual")
  local function delivery(c)
    for _ = 1, 4 do
      local tag = F.ensure_queue(c, mq, {ack = true, prefetch = 0})
      if c:publish("", mq, "to ack") then
        local m = F.next_delivery(c, tag, 2)
        if m then return m.delivery_tag end
      end
    end
    error("the storm cannot get a delivery to acknowledge", 0)
  end
  local tags = {{"an unknown tag", 1 << 40}, {"2^63 - 1", math.maxinteger}}
  local function ack_args()
    local c = F.open_connection()
    return table.pack(c, delivery(c), false)
  end
  F.vary("conn:ack", F.connection_methods.ack, ack_args, ignore_args(F.is_true), {selves, tags})
  local function nack_args()
    local c = F.open_connection()
    return table.pack(c, delivery(c), false, false)
  end
  F.vary("conn:nack", F.connection_methods.nack, nack_args, ignore_args(F.is_true), {selves, tags})
  local function reject_args()
    local c = F.open_connection()
    return table.pack(c, delivery(c), false)
  end
  F.vary("conn:reject", F.connection_methods.reject, reject_args, ignore_args(F.is_true), {selves, tags})

  local function args() return table.pack(F.open_connection(), nil) end
  F.vary("conn.__tostring", F.connection_meta.__tostring, args, ignore_args(F.tostring_result), {selves})
  F.vary("conn:close", F.connection_methods.close, args, ignore_args(F.nothing), {selves})
  F.vary("conn.__close", F.connection_meta.__close, args, ignore_args(F.nothing), {selves})
  F.vary("conn.__gc", F.connection_meta.__gc, args, ignore_args(F.nothing), {selves})

  -- valid arguments on a closed connection: nil, message, 'closed' from every method
  local closed = assert(rpc.connect {url = F.URL})
  local tag = delivery(closed)
  closed:close()
  local calls = {
    declare_exchange = {F.exchange("closed"), "direct"}, declare_queue = {}, bind = {mq, "amq.direct"},
    unbind = {mq, "amq.direct"}, publish = {"", mq, "x"}, consume = {mq}, cancel = {"a tag"},
    receive = {0}, ack = {tag}, nack = {tag}, reject = {tag}, purge = {mq}, delete_queue = {mq},
    delete_exchange = {"amq.direct"}, pollfd = {}, events = {}, timeout = {}, step = {},
  }
  for name, method in pairs(F.connection_methods) do
    if name ~= "close" then
      local label = ("conn:%s on a closed connection"):format(name)
      local outcome = F.check(label, function() return false, "nil, message, 'closed' expected" end, method, closed,
                              table.unpack((assert(calls[name], "no arguments for " .. name))))
      if outcome ~= "closed" and outcome ~= "violation" then F.violation(label, "got " .. outcome .. ", not closed") end
    end
  end
  F.check("conn:close on a closed connection", F.nothing, closed.close, closed)
  F.check("conn.__tostring on a closed connection", function(_, s)
    if s ~= "rpc.connection (closed)" then return false, "'rpc.connection (closed)' expected" end
    return true
  end, F.connection_meta.__tostring, closed)
end)
]==]
  end)

  it("a finalizer calling the connection while receive holds a message: 'connection in use' or it works, nothing torn", function()
    storm [==[
-- Garbage whose finalizer runs at every GC cycle, with a whole cycle at every allocation check
-- while armed. Each run probes whether the connection is reading a message (conn:ack(0) raises
-- "connection in use" then, and "delivery tag must be ..." otherwise: no side effect either
-- way); at the j-th such point it calls the method under test, so j walks the call through
-- every allocation of the message the receive builds (long strings, properties and headers: an
-- allocation each). Methods that close the connection come last: a crash hides what follows.
local system = require "system"
local function filled(s)   -- over 40 bytes: never interned, each copy allocates
  for i = 1, 20 do s = s .. ("." .. ("%x"):format(i)) end
  return s
end
F.run(function()
  local order = {"receive", "__tostring", "publish", "ack", "nack", "reject", "declare_queue", "declare_exchange",
                 "bind", "unbind", "consume", "cancel", "purge", "delete_queue", "delete_exchange", "close",
                 "__close", "__gc"}
  local body = filled("first")
  local properties = {content_type = filled("text/"), content_encoding = filled("e"), correlation_id = filled("c"),
                      reply_to = filled("r"), expiration = "600000", message_id = filled("m"), type = filled("t"),
                      app_id = filled("a"), priority = 3, timestamp = 1700000000, persistent = true,
                      headers = {a = filled("b"), [filled("k")] = 1, f = 0.5, t = true}}
  local conn, point, at, call   -- while armed: the connection probed, reading points seen, the one to call at
  local mt = {}
  mt.__gc = function()
    if conn then
      local _, e = pcall(conn.ack, conn, 0)
      if type(e) == "string" and e:find("connection in use", 1, true) then
        point = point + 1
        if point == at then call() end
      end
    end
    setmetatable({}, mt)   -- always one more: a finalizer at every GC cycle
  end
  setmetatable({}, mt)

  local function hot()   -- pause ~0, a whole cycle per step; started by the next "restart"
    collectgarbage("incremental", 1, 1000, 30)
    collectgarbage("stop")
  end
  local function cold() collectgarbage("incremental", 200, 100, 13) end

  --- A connection (the last one, unless closed) with a delivery of q in hand and what method
  -- name needs (a queue, a consumer, an exchange); returns it, the consumer tag of q and the
  -- arguments of the call.
  local current
  local function prepare(q, name)
    if not current or tostring(current):find("closed", 1, true) then current = assert(rpc.connect {url = F.URL}) end
    local c = current
    local tag = F.ensure_queue(c, q, {ack = true, prefetch = 0})
    assert(c:publish("", q, "pre"))
    local pre = assert(F.next_delivery(c, tag, 2))
    local other = F.queue("fin-other")
    if name == "bind" or name == "unbind" or name == "consume" or name == "cancel" or name == "purge"
       or name == "delete_queue" then
      F.ensure_queue(c, other)
    end
    local args = {
      receive = {0}, __tostring = {}, publish = {"", q, "second"}, ack = {pre.delivery_tag},
      nack = {pre.delivery_tag, false, false}, reject = {pre.delivery_tag, false},
      declare_queue = {"", {exclusive = true}}, declare_exchange = {F.exchange("fin"), "fanout"},
      bind = {other, "amq.direct", "fin-key"}, unbind = {other, "amq.direct", "fin-key"},
      consume = {other, {ack = false}}, purge = {other}, delete_queue = {other}, close = {}, __close = {}, __gc = {},
    }
    if name == "cancel" then args.cancel = {(assert(c:consume(other, {ack = false})))} end
    if name == "delete_exchange" then
      args.delete_exchange = {F.exchange("fin")}
      assert(c:declare_exchange(args.delete_exchange[1], "fanout"))
    end
    return c, tag, args[name]
  end

  local function is_first(tag)
    return function(_, msg)
      if type(msg) ~= "table" or msg.consumer_tag ~= tag or msg.returned ~= nil
         or math.type(msg.delivery_tag) ~= "integer" then
        return false, "not the delivery it waited for"
      end
      return F.carries(msg, body, properties)
    end
  end

  --- After the storm's call: unless closed, the connection still makes a round trip.
  local function still_works(label, c)
    if not tostring(c):find("closed", 1, true) then
      F.must(label .. ", then a round trip on the connection", function(_, msg) return F.carries(msg, "after") end,
             F.round_trip, c, "after")
    end
  end

  local function finalizer_call(label, c, method, args)
    return function()
      local outcome, message = F.check(label .. ": the finalizer's call", F.any, method, c, table.unpack(args))
      if outcome == "bad" and not message:find("connection in use", 1, true) then
        F.violation(label, "the finalizer's call raised " .. F.show(message))
      end
    end
  end

  for _, name in ipairs(order) do
    local method = F.connection_methods[name] or F.connection_meta[name]
    local q = F.queue("fin")
    for j = 1, 100 do
      local c, tag, args = prepare(q, name)
      local label = ("conn:receive with a finalizer calling conn:%s at its reading point %d"):format(name, j)
      call = finalizer_call(label, c, method, args)
      assert(c:publish("", q, body, properties))
      hot()
      conn, point, at = c, 0, j
      collectgarbage("restart")
      local outcome, m = F.check(label, is_first(tag), c.receive, c, 2)
      conn = nil
      cold()
      if outcome == "ok" and not tostring(c):find("closed", 1, true) then
        F.check(label .. ", then :ack(its tag)", F.any, c.ack, c, m.delivery_tag)
      end
      still_works(label, c)
      if point < j then break end   -- no j-th point: the next method
    end
  end

  -- Messages read ahead: a connection quiet for over a second reads what arrived before its
  -- next operation (into the inbox), building the messages there. One connection per method,
  -- each made quiet in turn: any wait (it runs the loop) reads every other open connection
  -- ahead, out of the finalizer's reach.
  local quiet = {}
  for _, name in ipairs {"receive", "close"} do
    current = nil   -- a connection of its own
    local q = F.queue("fin-quiet")
    local qc, tag, args = prepare(q, name)
    quiet[#quiet + 1] = {name = name, c = qc, tag = tag, args = args, q = q}
  end
  for _, case in ipairs(quiet) do
    local qc = case.c
    assert(qc:publish("", case.q, body, properties))
    assert(qc:publish("", case.q, body, properties))
    system.sleep(1.2)
    local label = ("conn:declare_queue reading messages ahead, with a finalizer calling conn:%s"):format(case.name)
    call = finalizer_call(label, qc, F.connection_methods[case.name] or F.connection_meta[case.name], case.args)
    hot()
    conn, point, at = qc, 0, 1
    collectgarbage("restart")
    F.check(label, F.any, qc.declare_queue, qc, "", {exclusive = true})
    conn = nil
    cold()
    if point < 1 then F.violation(label, "no message was read ahead: the spec is wrong") end
    if not tostring(qc):find("closed", 1, true) then
      for i = 1, 2 do F.check(label .. ", then :receive message " .. i, is_first(case.tag), qc.receive, qc, 2) end
    end
    still_works(label, qc)
  end
end)
]==]
  end)

  it("server and serve opts.bind, client opts.exchange: any value is allowed; a call through a binding reaches its server", function()
    storm [==[
F.run(function()
  local function echo(body) return body end
  local conn = F.open_connection()
  local x = F.exchange("bind")   -- a direct exchange that exists
  assert(conn:declare_exchange(x, "direct"))
  local function short(v) return type(v) == "string" and #v <= 255 end
  --- the bindings in opts.bind, read raw: one table, or a list
  local function bindings_of(opts)
    local b = type(opts) == "table" and rawget(opts, "bind")
    if type(b) ~= "table" then return {} end
    if rawlen(b) == 0 then return {b} end
    local list = {}
    for i = 1, rawlen(b) do list[i] = rawget(b, i) end
    return list
  end
  --- A server made with bindings: each gets the echo of a call published through it (to its
  -- exchange, with its routing key, or the queue's name).
  local function declared(args)
    F.declared(args)
    for _, b in ipairs(bindings_of(args[3])) do
      if type(b) == "table" and short(rawget(b, "exchange")) and rawget(b, "type") ~= nil then
        F.leftover_exchange(rawget(b, "exchange"))
      end
    end
  end
  local function bound(label, args, s)
    declared(args)
    if not F.is(s, "rpc.server") then return false, "an rpc.server expected" end
    local queue = F.queue_of(s)
    for i, b in ipairs(bindings_of(args[3])) do
      local key = rawget(b, "routing_key")
      if key == nil then key = queue end
      F.must(("%s then a call through its binding %d"):format(label, i), F.reply_is("ping"), F.client.call,
             F.client, "ping", 2, {exchange = rawget(b, "exchange"), routing_key = key})
      local cut = type(key) == "string" and key:match("^(%Z*)%z")
      if cut then   -- a key with a NUL inside is bound whole: the part before the NUL reaches nothing
        local label2 = ("%s then a call with the part of its binding %d's key before the NUL"):format(label, i)
        local function reached() return false, "it reached the server: the key was cut at the NUL" end
        local outcome = F.check(label2, reached, F.client.call, F.client, "ping", 2,
                                {exchange = rawget(b, "exchange"), routing_key = cut})
        if outcome ~= "no_route" and outcome ~= "violation" then
          F.violation(label2, "got " .. outcome .. ", not no_route")
        end
      end
    end
    s:close()
    return true
  end
  local function served(label, args, ...)   -- rpc.serve(queue, handler, opts) ran, and was stopped
    declared(args)
    return F.is_true(label, ...)
  end
  local function key() return F.queue("key") end   -- a fresh routing key (not a queue)
  local function args()
    return table.pack(F.queue("bind", true), echo,
                      {url = F.URL, auto_delete = true, bind = {exchange = x, routing_key = key()}})
  end

  -- opts.bind: every value, bindings, lists, and bindings with a key of every value
  local hundred = {}
  for i = 1, 100 do hundred[i] = {exchange = x, routing_key = key() .. i} end
  local binds = {
    {"one binding", {exchange = x}}, {"a list of one", {{exchange = x, routing_key = key()}}},
    {"a list of three", {{exchange = x, routing_key = key()}, {exchange = "amq.direct", routing_key = key()},
                         {exchange = "amq.topic", routing_key = "fuzz." .. key() .. ".#"}}},
    {"the same binding twice", (function()
      local k = key()
      return {{exchange = x, routing_key = k}, {exchange = x, routing_key = k}}
    end)()},
    {"100 bindings", hundred},
    {"a list with a non-table", {{exchange = x}, 1}}, {"a list with a hole", {{exchange = x}, nil, {exchange = x}}},
    {"{{}}", {{}}}, {"a binding with a list part", {exchange = x, {exchange = x, routing_key = key()}}},
    {"a binding with raising metamethods", F.evil {exchange = x}},
    {"a list with raising metamethods", F.evil {{exchange = x}}},
    {"a list whose binding has raising metamethods", {F.evil {exchange = x}}},
    {"a binding declaring a topic exchange", {exchange = F.exchange("topic"), type = "topic", routing_key = "fuzz.*"}},
    {"a binding declaring a durable fanout exchange",
     {exchange = F.exchange("fanout"), type = "fanout", durable = true}},
    {"a binding to a missing exchange", {exchange = F.exchange("missing")}},
  }
  for _, v in ipairs(F.values()) do
    if not rawequal(v[2], F.NONE) and v[2] == v[2] and v[2] ~= nil then
      binds[#binds + 1] = {"a binding with the key " .. v[1], {exchange = x, [v[2]] = 1}}
    end
    if not rawequal(v[2], F.NONE) then binds[#binds + 1] = {"{" .. v[1] .. "}", {v[2]}} end
  end
  F.vary_options("rpc.server", rpc.server, args, 3, {"bind"}, bound, {bind = binds})

  -- each key of a binding, alone or the second of a list; type and durable on a new exchange
  local names = {{"255 bytes", ("e"):rep(255)}, {"256 bytes", ("e"):rep(256)}}
  local extra = {
    exchange = {{'"amq.direct"', "amq.direct"}, {'"amq.topic"', "amq.topic"}, {'"amq.fanout"', "amq.fanout"},
                {'"amq.headers"', "amq.headers"}, {'"amq.match"', "amq.match"},
                {"a missing exchange", F.exchange("none")},
                names[1], names[2]},
    routing_key = {{'"#"', "#"}, {'"*"', "*"}, {"255 bytes", ("k"):rep(255)}, {"256 bytes", ("k"):rep(256)},
                   {"a key with a NUL inside", "fuzz\0tail"}},
    type = {{'"direct"', "direct"}, {'"fanout"', "fanout"}, {'"topic"', "topic"}, {'"headers"', "headers"},
            {'"Direct"', "Direct"}, {'"x-custom"', "x-custom"}},
  }
  local keys = {"exchange", "routing_key", "type", "durable", "colour", 1}
  local function binding(a) return rawget(a[3], "bind") end
  F.vary_options("rpc.server bind", rpc.server, args, binding, keys, bound, extra)
  local function new_exchange_args()
    return table.pack(F.queue("bind", true), echo, {url = F.URL, auto_delete = true,
      bind = {exchange = F.exchange("new"), type = "direct", routing_key = key()}})
  end
  F.vary_options("rpc.server bind", rpc.server, new_exchange_args, binding, {"type", "durable"}, bound, extra)
  local function list_args()
    return table.pack(F.queue("bind", true), echo, {url = F.URL, auto_delete = true,
      bind = {{exchange = x, routing_key = key()},
              {exchange = F.exchange("list"), type = "topic", routing_key = key()}}})
  end
  local function second(a) return rawget(a[3], "bind")[2] end
  F.vary_options("rpc.server bind[2]", rpc.server, list_args, second, keys, bound, extra)

  -- rpc.serve: every value as opts.bind (a run is stopped by SIGTERM)
  local serve = F.bounded(rpc.serve)
  F.vary_options("rpc.serve", serve, args, 3, {"bind"}, served, {bind = {
    {"one binding", {exchange = x}},
    {"a list of two", {{exchange = x}, {exchange = "amq.direct", routing_key = key()}}},
    {"a binding with raising metamethods", F.evil {exchange = x}},
  }})

  -- a run ended by SIGTERM leaves no trace: a connection's receive still waits for its message
  F.must("after rpc.serve returned on SIGTERM, a round trip on a connection",
         function(_, m) return F.carries(m, "after serve") end, F.round_trip, F.open_connection(), "after serve")

  -- rpc.client's exchange: a server bound to amq.direct with its queue's name as the key
  local target = F.queue("via")
  local server = assert(rpc.server(target, echo, {url = F.URL, auto_delete = true, bind = {exchange = "amq.direct"}}))
  local function through(label, a, c)
    if not F.is(c, "rpc.client") then return false, "an rpc.client expected" end
    local exchange = type(a[2]) == "table" and rawget(a[2], "exchange")
    local check = (exchange == nil or exchange == "" or exchange == "amq.direct") and F.must or F.check
    check(label .. " then :call", F.reply_is("ping"), c.call, c, "ping")
    c:close()
    return true
  end
  local function client_args() return table.pack(target, {url = F.URL, timeout = 2, exchange = "amq.direct"}) end
  F.vary_options("rpc.client", rpc.client, client_args, 2, {"exchange"}, through, {exchange = {
    {'"amq.direct"', "amq.direct"}, {'"amq.topic"', "amq.topic"}, {"a missing exchange", F.exchange("none")},
    names[1], names[2],
  }})
  server:close()
end)
]==]
  end)
end)
