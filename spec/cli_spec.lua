-- The rabbitrpc command (bin/rabbitrpc, lua/rpc/cli.lua), driven as a user would: lua5.4 runs
-- the checkout's launcher with RPC_URL in the environment; servers are child processes.
local H = require "support.helpers"

local BIN = H.ROOT .. "/bin/rabbitrpc"

--- Runs rabbitrpc with args (a list); stdin: a file to read standard input from (default
-- /dev/null). Returns stdout, the exit status, stderr.
local function rabbitrpc(args, env, stdin)
  local words = {}
  for i, a in ipairs(args) do words[i] = H.quote(a) end
  local cmd = H.LUA .. " " .. H.quote(BIN) .. " " .. table.concat(words, " ")
  if stdin then cmd = "sh -c " .. H.quote("exec " .. cmd .. " < " .. H.quote(stdin)) end
  return H.run(cmd, env)
end

--- A `rabbitrpc serve QUEUE ...` child, once it is consuming.
local function serve(T, queue, ...)
  local child = T:spawn {script = "bin/rabbitrpc", args = {"serve", queue, ...}}
  child:wait_output("rabbitrpc: serving")
  return child
end

--- A --handler file that replies with what reached it: content type and headers (with their
-- Lua types), and raises for the body "fail".
local HEADERS_HANDLER = [[
return function(body, request)
  if body == "fail" then error("refused: " .. body, 0) end
  local parts = {"content_type=" .. tostring(request.content_type)}
  local keys = {}
  for k in pairs(request.headers or {}) do
    if k ~= "x-rpc-deadline" then keys[#keys + 1] = k end  -- every rabbitrpc request has one
  end
  table.sort(keys)
  for _, k in ipairs(keys) do
    local v = request.headers[k]
    parts[#parts + 1] = ("%s=%s:%s"):format(k, type(v), tostring(v))
  end
  return table.concat(parts, ";")
end
]]

local function scratch_file(name, content)
  local path = H.tmpdir() .. "/" .. name
  H.write_file(path, content)
  return path
end

describe("rabbitrpc call", function()
  local T, echo_queue, handler_queue, handler_server
  lazy_setup(function()
    T = H.scope(function() end)   -- closed in lazy_teardown
    echo_queue, handler_queue = H.queue("cli-echo"), H.queue("cli-handler")
    serve(T, echo_queue, "--echo")
    handler_server = serve(T, handler_queue, "--handler",
                           scratch_file("headers_handler.lua", HEADERS_HANDLER), "-v")
  end)
  lazy_teardown(function()
    T:close()
    H.cleanup()
  end)

  it("prints the reply to BODY followed by a newline", function()
    local out, status, err = rabbitrpc({"call", echo_queue, "hello world"})
    assert.equal(0, status, err)
    assert.equal("hello world\n", out)
    assert.equal("", err)
  end)

  it("sends all of standard input when BODY is absent, binary safe; --raw adds no newline", function()
    local bytes = {}
    for i = 0, 255 do bytes[#bytes + 1] = string.char(i) end
    local body = table.concat(bytes):rep(3)
    local file = scratch_file("binary.in", body)
    local out, status, err = rabbitrpc({"call", echo_queue, "--raw"}, nil, file)
    assert.equal(0, status, err)
    assert.equal(#body, #out)
    assert.is_true(out == body, "the reply differs from the 768 bytes sent")
    out, status, err = rabbitrpc({"call", echo_queue}, nil, file)
    assert.equal(0, status, err)
    assert.is_true(out == body .. "\n", "the reply is not the body and a newline")
  end)

  it("passes --header (strings) and --content-type to the handler", function()
    local out, status, err = rabbitrpc({"call", handler_queue, "x", "--content-type", "application/json",
      "--header", "tenant=acme", "--header", "n=42", "--header", "eq=a=b", "--header", "empty="})
    assert.equal(0, status, err)
    assert.equal("content_type=application/json;empty=string:;eq=string:a=b;n=string:42;tenant=string:acme\n", out)
  end)

  it("publishes through --exchange with QUEUE as the routing key", function()
    local exchange = "spec-cli-x-" .. H.hex(4)
    finally(function() H.amqp1 {op = "delete_exchange", exchange = exchange} end)
    H.amqp {{op = "declare_exchange", exchange = exchange, type = "direct"},
            {op = "bind", queue = echo_queue, exchange = exchange, routing_key = "to-echo"}}
    local out, status, err = rabbitrpc({"call", "--exchange", exchange, "to-echo", "via the exchange"})
    assert.equal(0, status, err)
    assert.equal("via the exchange\n", out)
    out, status, err = rabbitrpc({"call", "--exchange", exchange, "unbound-key", "x"})
    assert.equal(4, status, out .. err)
    assert.matches("^rabbitrpc: .+ %(no_route%)\n$", err)
  end)

  it("exits 1 with the handler's message and kind remote when the handler raises", function()
    local out, status, err = rabbitrpc({"call", handler_queue, "fail"})
    assert.equal(1, status, out .. err)
    assert.equal("", out)
    assert.equal("rabbitrpc: refused: fail (remote)\n", err)
  end)

  it("exits 3 (timeout) after --timeout when nobody serves the queue", function()
    local queue = H.queue("cli-idle")
    H.amqp1 {op = "declare", queue = queue}
    local elapsed, out, status, err = H.timed(rabbitrpc, {"call", queue, "x", "--timeout", "1"})
    assert.equal(3, status, out .. err)
    assert.matches("^rabbitrpc: .+ %(timeout%)\n$", err)
    assert.is_true(elapsed >= 0.95 and elapsed < 2, "took " .. elapsed .. " s")
  end)

  it("exits 4 (no_route) at once when no queue has that name", function()
    local elapsed, out, status, err = H.timed(rabbitrpc, {"call", H.queue("cli-nobody"), "x"})
    assert.equal(4, status, out .. err)
    assert.matches("^rabbitrpc: .+ %(no_route%)\n$", err)
    assert.is_true(elapsed < 2, "took " .. elapsed .. " s")
  end)

  it("exits 6 (auth) on a wrong password, which shows nowhere, from RPC_URL or --url", function()
    local url = H.url_with {password = "canary-" .. H.hex(6)}
    local out, status, err = rabbitrpc({"call", echo_queue, "x"}, {RPC_URL = url})
    assert.equal(6, status, out .. err)
    assert.matches("^rabbitrpc: .+ %(auth%)\n$", err)
    H.assert_no_password(out .. err, url)
    out, status, err = rabbitrpc({"call", echo_queue, "x", "--url", url})
    assert.equal(6, status, out .. err)
    assert.matches("^rabbitrpc: .+ %(auth%)\n$", err)
    H.assert_no_password(out .. err, url)
  end)

  it("exits 2 (usage) on a url the module refuses, without showing its password", function()
    local url = "amqp://user:canary-" .. H.hex(6) .. "@localhost:notaport/"
    local out, status, err = rabbitrpc({"call", echo_queue, "x", "--url", url})
    assert.equal(2, status, out .. err)
    assert.matches("^rabbitrpc: bad argument #2 to 'client' %(invalid url.*%) %(usage%)\n$", err)
    H.assert_no_password(out .. err, url)
  end)

  it("exits 5 (connection) when nothing listens at the url", function()
    local out, status, err = rabbitrpc({"call", echo_queue, "x", "--url", H.url_with {port = 1}})
    assert.equal(5, status, out .. err)
    assert.matches("^rabbitrpc: .+ %(connection%)\n$", err)
  end)

  it("exits 130 (interrupted) on Ctrl-C while it waits for a reply", function()
    local queue = H.queue("cli-ctrl-c")
    H.amqp1 {op = "declare", queue = queue}
    local child = T:spawn {script = "bin/rabbitrpc", args = {"call", queue, "x", "--timeout", "30"}}
    H.wait_until(function()   -- its request is in the queue: it is waiting
      return H.amqp1({op = "count", queue = queue}).messages == 1
    end, 5, "the request")
    child:kill("INT")
    assert.equal(130, child:wait(5), child:output())
    assert.matches("rabbitrpc: interrupted %(interrupted%)\n$", child:output())
  end)

  it("makes --repeat 50 calls, --parallel 5 in flight, and prints a summary", function()
    local out, status, err = rabbitrpc({"call", echo_queue, "ping", "--repeat", "50", "--parallel", "5"})
    assert.equal(0, status, out .. err)
    assert.equal("", err)
    assert.equal("50", out:match("calls: (%d+)"), out)
    assert.equal("50", out:match("ok: (%d+)"), out)
    assert.equal("0", out:match("failed: (%d+)"), out)
    assert.is_true(tonumber(out:match("rate: ([%d.]+) calls/s")) > 0, out)
    local figures = {out:match("latency: min ([%d.]+) p50 ([%d.]+) p90 ([%d.]+) p99 ([%d.]+) max ([%d.]+) ms")}
    assert.equal(5, #figures, out)
    for i = 2, 5 do
      assert.is_true(tonumber(figures[i - 1]) <= tonumber(figures[i]), out)
    end
    assert.is_true(tonumber(figures[1]) > 0, out)
  end)

  it("counts failures by kind with --repeat and exits with the kind's status", function()
    local out, status, err = rabbitrpc({"call", handler_queue, "fail", "--repeat", "3"})
    assert.equal(1, status, out .. err)
    assert.matches("calls: 3\n", out)
    assert.matches("failed: 3 %(remote 3%)\n", out)
    assert.matches("latency: none", out)
    assert.equal("rabbitrpc: 3 calls failed, the first: refused: fail (remote)\n", err)
  end)

  it("exits 2 (usage) with the usage on a bad option or value", function()
    for _, args in ipairs {{"call"}, {"call", echo_queue, "--bogus"}, {"call", echo_queue, "--timeout", "0"},
                           {"call", echo_queue, "--header", "novalue"}, {"call", echo_queue, "--repeat", "1.5"},
                           {}, {"serve", "q"}, {"serve", "q", "--echo", "--handler", "x.lua"}} do
      local out, status, err = rabbitrpc(args)
      assert.equal(2, status, table.concat(args, " ") .. ": " .. out .. err)
      assert.matches("^Usage: rabbitrpc", err)
      assert.matches("\nrabbitrpc: [^\n]+ %(usage%)\n$", err)
    end
  end)

  it("exits with a documented status and one line on stderr, never a traceback, whatever the argv", function()
    -- status -> the kinds its line may end with (README "The rabbitrpc command")
    local kinds = {[1] = {remote = true}, [2] = {usage = true, handler = true}, [3] = {timeout = true},
                   [4] = {no_route = true}, [5] = {connection = true}, [6] = {auth = true}, [7] = {tls = true},
                   [8] = {too_large = true}, [130] = {interrupted = true}}
    local function check(args, want, stdout)
      local shown = {}
      for i, a in ipairs(args) do shown[i] = ("%q"):format(a) end
      local what = "rabbitrpc " .. table.concat(shown, " ")
      local out, status, err = rabbitrpc(args)
      local context = ("%s: status %d, stdout %q, stderr %q"):format(what, status, out, err)
      assert.is_nil(err:find("traceback", 1, true), context)
      assert.is_nil(err:find("lua5.4:", 1, true), context)
      assert.is_nil((out .. err):find("canary-secret", 1, true), "the password shows: " .. context)
      if want then assert.equal(want, status, context) end
      if stdout then assert.equal(stdout, out, context) end
      if status == 0 then
        assert.equal("", err, context)
        return
      end
      -- the usage (for bad arguments) may come first: "Usage: ..." and its indented lines
      local lines = {}
      for line in err:gmatch("[^\n]*\n") do
        if not (line:find("^Usage: ") or (#lines == 0 and line:find("^%s"))) then lines[#lines + 1] = line end
      end
      assert.equal(1, #lines, "not one line: " .. context)
      local kind = lines[1]:match("^rabbitrpc: [^\n]- %(([%w_]+)%)\n$")
      assert.is_string(kind, context)
      if status == 9 then
        assert.is_nil(kinds[1][kind] or kinds[2][kind] or kinds[3][kind], context)
      else
        assert.is_true(kinds[status] and kinds[status][kind] or false, "status and kind disagree: " .. context)
      end
      assert.is_false(lines[1]:sub(1, -2):find("[%c\128-\255]") ~= nil, "control or non-ASCII bytes: " .. context)
    end

    local q, long = echo_queue, ("q"):rep(256)
    local binary = "\1\2\255\254"
    -- empty strings
    check({""}, 2)
    check({"call", "", ""}, 4)
    check({"call", q, ""}, 0, "\n")
    check({"call", q, "x", "--timeout", ""}, 2)
    check({"call", q, "x", "--url", ""}, 2)
    check({"call", q, "x", "--header", "="}, 2)
    check({"call", q, "x", "--header", ""}, 2)
    check({"call", q, "x", "--exchange", ""}, 0, "x\n")
    check({"call", q, "x", "--content-type", ""}, 0, "x\n")
    check({"call", q, "x", "--repeat", ""}, 2)
    check({"serve", q, "--handler", ""}, 2)
    check({"serve", q, "--echo", "--prefetch", ""}, 2)
    -- binary (NUL-free) and control bytes, in names, bodies, headers, options
    check({"call", q, binary}, 0, binary .. "\n")
    check({"call", q, "x", "--header", "k=" .. binary}, 0, "x\n")
    check({"call", "a\nb", "x"}, 4)
    check({"call", binary, "x"}, 4)
    check({"call", q, "x", "--a\nb"}, 2)
    check({"call", q, "x", "--exchange", "e\nx"}, 4)
    check({"call", q, "x", "--url", "amqp://a\nb:canary-secret@localhost:1/"}, 5)
    check({"call", q, "x", "--url", "amqp://a b:canary-secret@local\nhost:1/"}, 5)
    check({"call", q, "x", "--url", "amqp://u:canary-secret@localhost:notaport/"}, 2)
    check({"call", q, "x", "amqp://u:canary-secret@localhost:1/"}, 2)   -- a url where no url goes
    check({"call", long, "x"}, 2)
    check({"call", q, "x", "--content-type", ("c"):rep(300)}, 2)
    check({"call", q, "x", "--header", ("k"):rep(300) .. "=v"}, 2)
    -- --timeout
    for _, t in ipairs {"0", "-1", "-0", "nan", "-nan", "inf", "-inf", "1e400", "1e6", "1e6.5", "1000001", "0.0001",
                        "0x1p-1074", "1e-320", "5s", " 1", "0x10p"} do
      check({"call", q, "x", "--timeout", t}, t == "1e6" and 0 or (t == " 1" and 0) or 2)
      check({"call", q, "x", "--timeout=" .. t}, t == "1e6" and 0 or (t == " 1" and 0) or 2)
    end
    -- --repeat and --parallel
    for _, n in ipairs {"0", "-1", "1.5", "1e10", "1000000001", "99999999999999999999", "inf", "nan", "0x", "-0"} do
      check({"call", q, "x", "--repeat", n}, 2)
      check({"call", q, "x", "--repeat=" .. n}, 2)
      check({"call", q, "x", "--repeat", "2", "--parallel", n}, 2)
    end
    check({"call", q, "x", "--repeat", "3", "--parallel", "1000000"}, 0)
    check({"call", q, "x", "--parallel", "7"}, 0)
    check({"call", q, "x", "--repeat", "2", "--repeat", "3"}, 0)
    check({"call", q, "x", "--parallel", "1000001", "--repeat", "3"}, 2)
    -- unknown flags and odd words
    for _, flag in ipairs {"-x", "-1", "--bogus", "--bogus=1", "--=", "---", "--timeout-", "--TIMEOUT", "-rx", "-hx"} do
      check({"call", q, "x", flag}, flag == "-hx" and 0 or 2)
    end
    check({"call", q, "a", "b", "c"}, 2)
    check({"call", q, "x", "--exchange"}, 2)
    check({"frobnicate"}, 2)
    check({"--bogus"}, 2)
    check({"serve"}, 2)
    check({"serve", q, "--echo", "--prefetch", "0"}, 2)
    check({"serve", q, "--echo", "--prefetch", "65536"}, 2)
    check({"serve", q, "--echo", "--reply-to-allow", "["}, 2)
    check({"serve", long, "--echo"}, 2)
  end)

  it("serve -v prints one line per request on stderr: time, id, size, outcome", function()
    local before = select(2, handler_server:output():gsub("id=", ""))
    assert.equal(0, select(2, rabbitrpc({"call", handler_queue, "12345"})))
    assert.equal(1, select(2, rabbitrpc({"call", handler_queue, "fail"})))
    local out = H.wait_until(function()
      local o = handler_server:output()
      return select(2, o:gsub("id=", "")) >= before + 2 and o
    end, 5, "two -v lines")
    assert.matches("\n%d%d%d%d%-%d%d%-%d%dT%d%d:%d%d:%d%dZ id=%x+%-[%x-]+ body=5B [%d.]+ms ok reply=%d+B\n", out)
    assert.matches("\n%d%d%d%d%-%d%d%-%d%dT[%d:.]+Z id=[%x-]+ body=4B [%d.]+ms error: refused: fail\n", out)
    H.assert_no_password(out)
  end)
end)

describe("rabbitrpc serve", function()
  teardown(H.cleanup)

  it("--echo answers a call, then exits 0 on SIGTERM", function()
    local T = H.scope(finally)
    local queue = H.queue("cli-serve")
    local server = serve(T, queue, "--echo", "--prefetch", "5", "--reply-to-allow", "spec%-.*")
    assert.matches("prefetch 5", server:output())
    local out, status, err = rabbitrpc({"call", queue, "are you there"})
    assert.equal(0, status, err)
    assert.equal("are you there\n", out)
    server:kill("TERM")
    assert.equal(0, server:wait(5), server:output())
    H.assert_no_password(server:output())
  end)

  it("exits 0 on SIGINT too", function()
    local T = H.scope(finally)
    local server = serve(T, H.queue("cli-serve-int"), "--echo")
    server:kill("INT")
    assert.equal(0, server:wait(5), server:output())
  end)

  it("refuses a --handler file that does not return a function, or does not load, before connecting", function()
    local cases = {
      {scratch_file("returns_number.lua", "return 42"), "must return a function, it returned a number"},
      {scratch_file("returns_nothing.lua", "local x = 1"), "must return a function, it returned nothing"},
      {scratch_file("raises.lua", "error('no config', 0)"), "raised: no config"},
      {scratch_file("syntax.lua", "return function("), "cannot load the handler: .*syntax.lua"},
      {H.tmpdir() .. "/missing.lua", "cannot load the handler: .*missing.lua"},
    }
    for _, case in ipairs(cases) do
      local out, status, err = rabbitrpc({"serve", H.queue("cli-bad-handler"), "--handler", case[1]},
                                         {RPC_URL = H.url_with {port = 1}})
      assert.equal(2, status, out .. err)
      assert.matches("^rabbitrpc: [^\n]*" .. case[2] .. "[^\n]* %(handler%)\n$", err)
    end
  end)
end)

describe("rabbitrpc --help", function()
  teardown(H.cleanup)
  local url = "amqp://canary-user:canary-secret-2f9@localhost:5673/"

  it("is printed by rpc.cli.main, which returns 0 rather than exiting; so is --version", function()
    local cli = require "rpc.cli"
    local written = {}
    local stream = {write = function(self, ...)
      for _, s in ipairs {...} do written[#written + 1] = s end
      return self
    end}
    assert.equal(0, cli.main({"serve", "--help"}, {stdout = stream, stderr = stream}))
    assert.matches("^Usage: rabbitrpc serve", table.concat(written))
    written = {}
    assert.equal(0, cli.main({"--version"}, {stdout = stream, stderr = stream}))
    assert.equal(require("rpc")._VERSION .. "\n", table.concat(written))
    written = {}
    assert.equal(2, cli.main({"call"}, {stdout = stream, stderr = stream}))
    assert.matches("rabbitrpc: missing argument 'queue' %(usage%)\n$", table.concat(written))
  end)

  it("for the command, call and serve, exits 0, lists the options and never shows RPC_URL's password", function()
    local expected = {
      [""] = {"call", "serve", "Exit status", "130", "interrupted", "no_route"},
      call = {"--timeout", "--url", "RPC_URL", "--header", "--content-type", "--exchange", "--raw",
              "--repeat", "--parallel", "default: 30", "Exit status"},
      serve = {"--echo", "--handler", "--prefetch", "--url", "RPC_URL", "--reply-to-allow", "-v, --verbose",
               "SIGTERM", "Exit status"},
    }
    for command, words in pairs(expected) do
      for _, flag in ipairs {"--help", "-h"} do
        local args = command == "" and {flag} or {command, flag}
        local out, status, err = rabbitrpc(args, {RPC_URL = url})
        assert.equal(0, status, out .. err)
        assert.equal("", err)
        assert.matches("^Usage: rabbitrpc" .. (command == "" and "" or " " .. command), out)
        for _, word in ipairs(words) do assert.matches(word, out, 1, true) end
        H.assert_no_password(out, url)
      end
    end
  end)
end)
