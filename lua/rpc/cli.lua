--- The `rabbitrpc` command: RabbitMQ request-reply from the shell, over the public rpc module.
--   rabbitrpc call QUEUE [BODY]      rabbitrpc serve QUEUE (--echo | --handler FILE.lua)
-- bin/rabbitrpc is the launcher: os.exit(require("rpc.cli").main(arg)). main never exits and
-- never raises for a user's mistake: it returns the exit status (see EXIT below).
local argparse = require "argparse"
local rpc = require "rpc"

local M = {}

--- Exit status per error kind; any other kind exits with EXIT.other.
local EXIT = {
  ok = 0, remote = 1, usage = 2, handler = 2, timeout = 3, no_route = 4, connection = 5,
  auth = 6, tls = 7, too_large = 8, broker = 9, blocked = 9, closed = 9, other = 9,
  interrupted = 130,
}
M.EXIT = EXIT

local EXIT_HELP = [[
Exit status:
  0    success (serve: stopped by SIGINT or SIGTERM)
  1    remote      the server's handler failed
  2    usage       bad arguments, or a --handler file that cannot be used
  3    timeout     no reply within --timeout
  4    no_route    no queue of that name (or nothing bound to it on --exchange)
  5    connection  the broker is unreachable, or the connection was lost
  6    auth        login refused, or no access to the vhost
  7    tls         TLS handshake or certificate verification failed
  8    too_large   a body over the size limit
  9    broker, blocked or any other failure
  130  interrupted (Ctrl-C)
Each failure prints one line on stderr: "rabbitrpc: <message> (<kind>)".
The broker's password never shows in any output.]]

local URL_HELP = "Broker url, amqp[s]://user:password@host:port/vhost. Default: env RPC_URL, "
  .. "else amqp://localhost:5672/ as guest. Prefer RPC_URL: it keeps the password out of ps "
  .. "and shell history."

-- ---- argument checks (argparse converters: a value, or nil and a message) ----

local function positive_number(name)
  return function(s)
    local n = tonumber(s)
    if not n or n ~= n or n <= 0 or n > 1e6 then
      return nil, ("%s must be a number of seconds above 0 (at most 1e6), got '%s'"):format(name, s)
    end
    return n
  end
end

local function positive_integer(name, max)
  return function(s)
    local n = math.tointeger(tonumber(s))
    if not n or n < 1 or n > max then
      return nil, ("%s must be an integer from 1 to %d, got '%s'"):format(name, max, s)
    end
    return n
  end
end

local function header(s)
  local k, v = s:match("^([^=]+)=(.*)$")
  if not k then return nil, ("--header must look like key=value, got '%s'"):format(s) end
  return {k, v}
end

-- ---- the parser ----

--- Builds the parser. -h/--help and --version set wanted.help (the (sub)command's parser) and
-- wanted.version: main then prints them and returns 0 (argparse's own would call os.exit).
local function build_parser(wanted)
  local function add_help(p)
    p:add_help(false)
    p:flag("-h --help", "Show this help and exit."):action(function() wanted.help = wanted.help or p end)
    return p
  end

  local parser = add_help(argparse("rabbitrpc")
    :description("RabbitMQ request-reply (RPC) from the shell: call a service, or serve a queue.")
    :epilog("Examples:\n"
      .. "  export RPC_URL=amqp://user:password@localhost:5672/\n"
      .. "  rabbitrpc serve echo --echo &\n"
      .. "  rabbitrpc call echo hello                  # prints hello\n"
      .. "  rabbitrpc call rpc_queue < request.bin > reply.bin --raw\n"
      .. "  rabbitrpc call echo x --repeat 1000 --parallel 10\n"
      .. "Run 'rabbitrpc call --help' or 'rabbitrpc serve --help' for their options.\n\n"
      .. EXIT_HELP)
    :command_target("command")
    :help_max_width(96))
  parser:flag("--version", "Print the version and exit."):action(function() wanted.version = true end)

  local call = add_help(parser:command("call")
    :summary("Send one request (or many) and print the reply.")
    :description("Publishes BODY (or, without BODY, all of standard input, any bytes) to QUEUE "
      .. "and writes the reply to standard output, followed by a newline unless --raw. "
      .. "Put -- before a BODY that starts with '-'. With --repeat or --parallel the replies "
      .. "are not printed: a summary is (calls, failures by kind, calls/s, latency "
      .. "min/p50/p90/p99/max in ms, and its p50/p99 split into the server's handler time "
      .. "and the rest: queue and transport).")
    :epilog(EXIT_HELP))
  call:argument("queue", "Routing key of the requests: the server's queue."):args(1)
  call:argument("body", "The request body (default: standard input)."):args("?")
  call:option("--timeout", "Seconds to wait for each reply.", "30")
    :argname("SECONDS"):convert(positive_number("--timeout"))
  call:option("--url", URL_HELP):argname("URL")
  call:option("--header", "A header key=value (a string) on the request; repeatable.")
    :argname("K=V"):count("*"):convert(header)
  call:option("--content-type", "The request's content type."):argname("TYPE")
  call:option("--exchange", "Publish through this exchange; QUEUE is then the routing key.")
    :argname("NAME")
  call:flag("-r --raw", "Write the reply's bytes only, with no newline after them.")
  call:option("--repeat", "Make N calls and print a summary instead of the replies.")
    :argname("N"):convert(positive_integer("--repeat", 1e9))
  call:option("--parallel", "Keep up to K calls in flight (with --repeat; default 1).")
    :argname("K"):convert(positive_integer("--parallel", 1e6))

  local serve = add_help(parser:command("serve")
    :summary("Serve QUEUE until SIGINT or SIGTERM.")
    :description("Declares QUEUE and answers its requests with --echo (the body back) or with "
      .. "the function a Lua file returns: function(body, request) return reply end, as for "
      .. "rpc.server (request has correlation_id, reply_to, content_type, headers, ...). "
      .. "A handler that raises sends the caller a remote error; serving goes on. "
      .. "Reconnects by itself when the connection is lost, telling standard error. "
      .. "Exits 0 on SIGINT or SIGTERM, after the request in hand.")
    :epilog(EXIT_HELP))
  serve:argument("queue", "The queue to declare and consume."):args(1)
  local echo = serve:flag("--echo", "Reply with each request's body.")
  local handler = serve:option("--handler", "A Lua file returning the handler function.")
    :argname("FILE.lua")
  serve:mutex(echo, handler)
  serve:option("--prefetch", "Requests the broker may send ahead.", "1")
    :argname("N"):convert(positive_integer("--prefetch", 65535))
  serve:option("--url", URL_HELP):argname("URL")
  serve:option("--reply-to-allow", "A queue name, or a Lua pattern matching the whole name, "
    .. "the server may reply to besides reply queues (rpc.server's reply_to_allow); repeatable.")
    :argname("PATTERN"):count("*")
  serve:flag("-v --verbose", "One line per request on standard error: time, correlation id, "
    .. "body size, duration, outcome.")

  return parser
end

-- ---- helpers ----

--- A printable, one-line version of s (a correlation id or a message may hold any bytes).
local function printable(s, max)
  s = tostring(s):gsub("[^\32-\126]", function(c) return ("\\x%02x"):format(c:byte()) end)
  if max and #s > max then s = s:sub(1, max) .. "..." end
  return s
end

--- A message as one printable line, with any url's password masked: a remote error's text is
-- the server's, and argparse repeats what was typed (a url given in the wrong place).
local function shown(message)
  local s = tostring(message):gsub("(%a[%w+.-]*://[^:/@%s]*:)[^@%s]*@", "%1****@")
  return printable(s, 2000)
end

--- The exit status for kind.
local function status_of(kind)
  return EXIT[kind] or EXIT.other
end

-- ---- call ----

local function call_options(args)
  local callopts = {}
  if args.content_type then callopts.content_type = args.content_type end
  if #args.header > 0 then
    callopts.headers = {}
    for _, kv in ipairs(args.header) do callopts.headers[kv[1]] = kv[2] end
  end
  if args.exchange then
    callopts.exchange = args.exchange
    callopts.routing_key = args.queue
  end
  return callopts
end

--- Nearest-rank percentile of a sorted list.
local function percentile(sorted, p)
  local i = math.max(1, math.ceil(p / 100 * #sorted))
  return sorted[i]
end

--- The summary lines splitting the successful calls' latencies into their handlers' time (the
-- reply's x-rpc-handler-time header: handler_times) and the rest (rests), in ms; missing:
-- replies without the header (a server that is not rabbitrpc, or older).
local function split_lines(handler_times, rests, missing)
  if #handler_times == 0 then return {"handler: unknown (no reply had an x-rpc-handler-time header)"} end
  table.sort(handler_times)
  table.sort(rests)
  local of = missing > 0 and (" (%d of %d replies)"):format(#handler_times, #handler_times + missing) or ""
  return {
    ("handler: p50 %.3f p99 %.3f ms%s"):format(percentile(handler_times, 50), percentile(handler_times, 99), of),
    ("queue+transport: p50 %.3f p99 %.3f ms%s"):format(percentile(rests, 50), percentile(rests, 99), of),
  }
end

--- --repeat N --parallel K: N calls, at most K in flight, waited for in the order sent.
-- Returns the summary lines and the failures ({kind = {count, message}}, kinds in order).
local function call_many(client, body, args, callopts)
  local now = rpc.now
  local n, k = args["repeat"] or 1, math.min(args.parallel or 1, args["repeat"] or 1)
  callopts.timeout = args.timeout
  callopts.properties = true   -- for the handler time its reply carries
  local latencies, failures, kinds = {}, {}, {}
  local handler_times, rests, missing = {}, {}, 0
  local function failed(kind, message)
    local f = failures[kind]
    if not f then
      f = {count = 0, message = message}
      failures[kind] = f
      kinds[#kinds + 1] = kind
    end
    f.count = f.count + 1
  end
  local queue, head, tail, sent = {}, 1, 0, 0   -- in flight: {id, sent at}, oldest first
  local start = now()
  while sent < n or head <= tail do
    while sent < n and tail - head + 1 < k do
      sent = sent + 1
      local t0 = now()
      local id, message, kind = client:send(body, callopts)
      if id then
        tail = tail + 1
        queue[tail] = {id, t0}
      else
        failed(kind, message)
      end
    end
    if head <= tail then
      local entry = queue[head]
      queue[head], head = nil, head + 1
      local reply, props_or_message, kind = client:wait(entry[1])
      if reply then
        local ms = (now() - entry[2]) * 1000
        latencies[#latencies + 1] = ms
        local handler_time = props_or_message.headers and props_or_message.headers["x-rpc-handler-time"]
        if type(handler_time) == "number" then
          handler_times[#handler_times + 1] = handler_time * 1000
          rests[#rests + 1] = ms - handler_time * 1000
        else
          missing = missing + 1
        end
      else
        failed(kind, props_or_message)
      end
    end
  end
  local elapsed = now() - start

  local lines = {("calls: %d"):format(n), ("ok: %d"):format(#latencies)}
  local by_kind = {}
  for _, kind in ipairs(kinds) do by_kind[#by_kind + 1] = ("%s %d"):format(kind, failures[kind].count) end
  lines[#lines + 1] = ("failed: %d%s"):format(n - #latencies,
    #by_kind > 0 and " (" .. table.concat(by_kind, ", ") .. ")" or "")
  lines[#lines + 1] = ("elapsed: %.3f s"):format(elapsed)
  lines[#lines + 1] = ("rate: %.1f calls/s"):format(elapsed > 0 and n / elapsed or 0)
  if #latencies > 0 then
    table.sort(latencies)
    lines[#lines + 1] = ("latency: min %.3f p50 %.3f p90 %.3f p99 %.3f max %.3f ms"):format(
      latencies[1], percentile(latencies, 50), percentile(latencies, 90),
      percentile(latencies, 99), latencies[#latencies])
    for _, line in ipairs(split_lines(handler_times, rests, missing)) do lines[#lines + 1] = line end
  else
    lines[#lines + 1] = "latency: none (no call succeeded)"
  end
  return lines, failures, kinds
end

local function run_call(args, sys)
  local body = args.body
  if body == nil then body = sys.stdin:read("a") or "" end
  local opts = {timeout = args.timeout}
  if args.url then opts.url = args.url end
  local client <close>, message, kind = rpc.client(args.queue, opts)
  if not client then return nil, message, kind end
  local callopts = call_options(args)

  if args["repeat"] or args.parallel then
    local lines, failures, kinds = call_many(client, body, args, callopts)
    if not lines then return nil, failures, kinds end
    sys.stdout:write(table.concat(lines, "\n"), "\n")
    for _, k in ipairs(kinds) do
      local f = failures[k]
      sys.stderr:write(("rabbitrpc: %d call%s failed, the first: %s (%s)\n")
        :format(f.count, f.count == 1 and "" or "s", shown(f.message), k))
    end
    return kinds[1] and status_of(kinds[1]) or EXIT.ok
  end

  local reply
  reply, message, kind = client:call(body, args.timeout, callopts)
  if not reply then return nil, message, kind end
  sys.stdout:write(reply)
  if not args.raw then sys.stdout:write("\n") end
  return EXIT.ok
end

-- ---- serve ----

--- The handler of --handler FILE: the function the file returns.
local function load_handler(path)
  local chunk, err = loadfile(path, "t")
  if not chunk then return nil, "cannot load the handler: " .. err, "handler" end
  local ok, handler = pcall(chunk)
  if not ok then
    return nil, ("the handler file %s raised: %s"):format(path, tostring(handler)), "handler"
  end
  if type(handler) ~= "function" then
    return nil, ("the handler file %s must return a function, it returned %s")
      :format(path, type(handler) == "nil" and "nothing" or "a " .. type(handler)), "handler"
  end
  return handler
end

--- handler, with one line per request on stderr (-v). The reply or error is passed on
-- unchanged, so the caller sees what it would without -v.
local function verbose(handler, sys)
  local now = rpc.now
  local function stamp()   -- whole seconds: Lua has no finer wall clock; durations use rpc.now
    return os.date("!%Y-%m-%dT%H:%M:%SZ")
  end
  local function log(request, body, t0, outcome)
    sys.stderr:write(("%s id=%s body=%dB %.2fms %s\n"):format(stamp(),
      request.correlation_id and printable(request.correlation_id, 80) or "-", #body,
      (now() - t0) * 1000, outcome))
  end
  return function(body, request)
    local t0 = now()
    local ok, reply = pcall(handler, body, request)
    if not ok then
      log(request, body, t0, "error: " .. printable(reply, 300))
      error(reply, 0)
    end
    if type(reply) == "string" then
      log(request, body, t0, ("ok reply=%dB"):format(#reply))
    elseif type(reply) == "number" then
      log(request, body, t0, ("ok reply=%dB"):format(#tostring(reply)))
    else
      log(request, body, t0, "error: the handler returned a " .. type(reply))
    end
    return reply
  end
end

local function run_serve(args, sys)
  local handler, message, kind
  if args.echo then
    handler = function(body) return body end
  else
    handler, message, kind = load_handler(args.handler)
    if not handler then return nil, message, kind end
  end
  if args.verbose then handler = verbose(handler, sys) end

  local opts = {
    prefetch = args.prefetch,
    log = function(line) sys.stderr:write("rabbitrpc: ", line, "\n") end,
  }
  if args.url then opts.url = args.url end
  if #args.reply_to_allow > 0 then opts.reply_to_allow = args.reply_to_allow end
  local server <close>, err, err_kind = rpc.server(args.queue, handler, opts)
  if not server then return nil, err, err_kind end
  sys.stderr:write("rabbitrpc: serving, SIGINT or SIGTERM stops: ", tostring(server), "\n")
  sys.stderr:flush()
  local ok
  ok, message, kind = server:run()
  if not ok then return nil, message, kind end
  return EXIT.ok
end

-- ---- main ----

--- Runs the command with argv (a list of strings, like the standalone interpreter's arg) and
-- returns the exit status. sys (for tests) may replace stdin, stdout and stderr.
function M.main(argv, sys)
  sys = sys or {}
  sys = {stdin = sys.stdin or io.stdin, stdout = sys.stdout or io.stdout,
         stderr = sys.stderr or io.stderr}
  local list = {}
  for i = 1, #(argv or {}) do list[i] = argv[i] end

  local wanted = {}
  local parser = build_parser(wanted)
  local parsed, args = parser:pparse(list)
  if wanted.help then
    sys.stdout:write(wanted.help:get_help(), "\n")
    return EXIT.ok
  elseif wanted.version then
    sys.stdout:write(rpc._VERSION, "\n")
    return EXIT.ok
  end
  if parsed and args.command == "serve" and not args.echo and not args.handler then
    parsed, args = false, "serve needs --echo or --handler FILE.lua"
  end
  if not parsed then
    local usage = parser:get_usage()   -- or the subcommand's, when argv names one
    for _, command in ipairs(parser._commands) do
      if command._name == list[1] then usage = command:get_usage() end
    end
    sys.stderr:write(usage, "\n", ("rabbitrpc: %s (usage)\n"):format(shown(args)))
    return EXIT.usage
  end

  local run = args.command == "call" and run_call or run_serve
  local ok, status, message, kind = xpcall(run, function(err)
    local s = tostring(err)
    -- lua5.4's Ctrl-C hook, or a bad argument raised by the rpc module (e.g. a url it refuses)
    if s:match("interrupted!$") then return {kind = "interrupted", message = "interrupted"} end
    local bad = s:match("^[^\n]-:%d+: (bad argument.*)$") or s:match("^bad argument.*$")
    if bad then return {kind = "usage", message = bad} end
    return {kind = "other", message = debug.traceback(s, 2)}
  end, args, sys)
  if not ok then
    message, kind = status.message, status.kind
    status = nil
  end
  if status then return status end
  sys.stderr:write(("rabbitrpc: %s (%s)\n"):format(kind == "other" and message or shown(message), kind))
  return status_of(kind)
end

return M
