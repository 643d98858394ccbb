-- Raise safety: what a raise, or a finalizer, in the middle of the library's work must not
-- leave behind: a call removed under its waiter, a closed client reconnected, a server busy
-- forever, a client or connection "in use" forever, signal handlers installed after run().
--
-- Out of memory is made on purpose by spec/support/oom.c (build/test/oom.so, built by make
-- test): it fails the allocations of one size, that of a Lua string of a distinctive length
-- (BIG), so only the copy the spec aims at fails. Scenarios that crash the process on a
-- defect run in a child lua5.4 (killed after a minute as hung); the spec asserts its exit
-- status and what it printed.
local H = require "support.helpers"

local BIG = 77777   -- a body or reply length nothing else uses
local OOM_DIR = H.ROOT .. "/build/test"
-- children find rpc.core as usual, and oom.so
local CHILD_CPATH = H.BUILD .. "/?.so;" .. OOM_DIR .. "/?.so;;"

--- The oom module: through busted's cpath if it names build/test, else from build/test.
local function load_oom()
  local ok, oom = pcall(require, "oom")
  if ok then return oom end
  local open = package.loadlib(OOM_DIR .. "/oom.so", "luaopen_oom")
  assert(open, "build/test/oom.so is missing: make build/test/oom.so (make test builds it)")
  return open()
end

--- The size Lua allocates for a string of n bytes (its header, the bytes, a NUL), probed:
-- string.sub copies n bytes with lua_pushlstring, as the library copies bodies.
local function string_size(oom, n)
  local s = ("s"):rep(n + 1)
  for extra = 0, 64 do
    oom.fail_size(n + extra)
    local ok = pcall(string.sub, s, 2)
    oom.off()
    if not ok then return n + extra end
  end
  error("no allocation of " .. n .. " to " .. n + 64 .. " bytes made a string of " .. n .. " bytes")
end

local runs = 0
--- Runs Lua code in a child lua5.4 (rpc and oom on its paths, signals at their defaults),
-- killed after limit seconds (default 60). Returns its output, exit status and stderr.
local function run_child(code, env, limit)
  runs = runs + 1
  local file = ("%s/raise%d.lua"):format(H.tmpdir(), runs)
  H.write_file(file, code)
  local all = {LUA_CPATH_5_4 = CHILD_CPATH}
  for k, v in pairs(env or {}) do all[k] = v end
  return H.run(("timeout -s KILL %d env --default-signal=INT,QUIT,TERM %s %s")
                 :format(limit or 60, H.LUA, H.quote(file)), all)
end

local function report(out, status, err)
  return ("child exit status %d; its output:\n%s\nits stderr:\n%s"):format(status, out, err)
end

describe("raise safety", function()
  teardown(H.cleanup)

  it("a handler waiting for the call its own caller waits for raises 'already being waited for', and the call gets nil, message, 'remote'", function()
    local queue = H.queue("self-wait")
    local out, status, err = run_child([[
io.stdout:setvbuf("line")
local rpc = require "rpc"
local URL, QUEUE = os.getenv("RPC_URL"), os.getenv("SPEC_QUEUE")
local client = assert(rpc.client(QUEUE, {url = URL, timeout = 5}))
local server = assert(rpc.server(QUEUE, function(body, request)
  if body ~= "outer" then return "echo:" .. body end
  -- the call that is waiting for this very reply, further down this Lua state's stack
  local reply, message, kind = client:wait(request.correlation_id, 0.5)
  return ("the inner wait returned %s, %s, %s"):format(tostring(reply), tostring(message), tostring(kind))
end, {url = URL, auto_delete = true}))
local reply, message, kind = client:call("outer", 5)
print("OUTER", tostring(reply), tostring(message), tostring(kind))
print("AFTER", client:call("again", 5))
server:close()
client:close()
print("DONE")
]], {SPEC_QUEUE = queue})
    assert.equal(0, status, report(out, status, err))
    local message = out:match("OUTER\tnil\t([^\n]*)\tremote\n")
    assert.is_string(message, "the outer call did not get nil, message, 'remote': " .. out)
    assert.matches("already being waited for", message, 1, true)
    assert.matches("AFTER\techo:again\n", out, 1, true)
    assert.matches("DONE", out, 1, true)
  end)

  it("a finalizer closing the client while call reads replies before publishing makes the call return nil, message, 'closed'", function()
    local queue = H.queue("gc-close")
    local out, status, err = run_child([[
io.stdout:setvbuf("line")
local rpc = require "rpc"
local system = require "system"
local URL, QUEUE = os.getenv("RPC_URL"), os.getenv("SPEC_QUEUE")
local server = assert(rpc.server(QUEUE, function(body) return "re:" .. body end, {url = URL, auto_delete = true}))
local client = assert(rpc.client(QUEUE, {url = URL, timeout = 5}))
assert(client:send("early"))   -- never waited for: its reply is kept when read
assert(server:poll(5) == 1, "the server did not get the request")
-- the reply now waits in the client's socket, and the client has been quiet for over 1 s:
-- call reads before publishing, and keeps that reply (a Lua string: an allocation)
system.sleep(1.2)
local where
local mt = {__gc = function()
  where = debug.traceback("the finalizer", 1)
  client:close()
end}
-- from a full collection, a whole cycle at every allocation check: the first allocation after
-- "restart" (the kept reply) collects the garbage below and runs its finalizer
collectgarbage("incremental", 1, 1000, 30)
collectgarbage("collect")
collectgarbage("stop")
setmetatable({}, mt)
collectgarbage("restart")
local reply, message, kind = client:call("late", 2)
collectgarbage("incremental", 200, 100, 13)
print("CALL", tostring(reply), tostring(message), tostring(kind))
print("FINALIZER", tostring(where))
print("CLIENT", tostring(client))
server:close()
print("DONE")
]], {SPEC_QUEUE = queue})
    assert.equal(0, status, report(out, status, err))
    assert.matches("FINALIZER\tthe finalizer", out, 1, true)
    -- it ran inside call (not before it): the call's C frame is on its stack
    assert.matches("in method 'call'", out:match("FINALIZER\t.-\nCLIENT") or "", 1, true)
    local message = out:match("CALL\tnil\t([^\n]*)\tclosed\n")
    assert.is_string(message, "the call did not return nil, message, 'closed': " .. out)
    assert.matches("closed", message, 1, true)
    assert.matches("CLIENT\trpc.client (closed)", out, 1, true)
    assert.matches("DONE", out, 1, true)
  end)

  it("a server whose arguments table became invalid after rpc.server reconnects when the broker closes its connection, and serves on #slow", function()
    local T = H.scope(finally)
    local queue = H.queue("args-changed")
    local args = {["x-max-length"] = 100}
    local lines = {}
    local before = H.broker_ports()
    local server = T:server(queue, function(body) return "back:" .. body end,
                            {arguments = args, log = function(line) lines[#lines + 1] = line end})
    local mine = H.new_ports(before, H.broker_ports())
    assert.equal(1, #mine)
    args["x-bad"] = function() end   -- a re-declare from this table would raise
    local _, pids = H.broker_connections()
    assert.is_string(pids[mine[1]], "rabbitmqctl does not list the server's connection")
    local out, status = H.ctl("close_connection", pids[mine[1]], "spec: forced close")
    assert.equal(0, status, out)
    local raised
    H.wait_until(function()
      local ok, n = pcall(server.poll, server, 0.1)
      if not ok then raised = tostring(n) return true end
      return server:stats().reconnects >= 1 and server:stats().connected
    end, 15, "the server to reconnect")
    assert.is_nil(raised, "server:poll raised while the server reconnected: " .. tostring(raised))
    local ok, n = pcall(server.poll, server, 0)
    assert.is_true(ok, "server:poll raised after the reconnect: " .. tostring(n))
    assert.equal(0, n)
    local client = T:client(queue)
    assert.equal("back:y", client:call("y", 5))
    assert.is_true(server:stats().reconnects >= 1)
    assert.matches("reconnected to amqp://", table.concat(lines, "\n"), 1, true)
  end)

  it("out of memory building a request for the handler becomes an error reply 'not enough memory', the request acked, and the server serves on", function()
    local oom = load_oom()
    local size = string_size(oom, BIG)
    local T = H.scope(finally)
    local queue = H.queue("oom-request")
    local handled = 0
    local server = T:server(queue, function(body, request)   -- two parameters: a request table too
      handled = handled + 1
      return ("%d bytes, %s"):format(#body, type(request))
    end)
    local client = T:client(queue, {timeout = 5})
    local id = client:send(("q"):rep(BIG))
    T:defer(oom.off)
    oom.fail_size(size)   -- the server's copy of the body
    local ok, n = pcall(server.poll, server, 5)
    local failures = oom.off()
    assert.is_true(failures > 0, "no allocation of a " .. BIG .. "-byte string failed: the spec is wrong")
    assert.is_true(ok, "server:poll raised: " .. tostring(n))
    assert.equal(1, n)
    assert.equal(0, handled)
    local reply, message, kind = client:wait(id, 5)
    assert.is_nil(reply)
    assert.equal("remote", kind, message)
    assert.matches("not enough memory", message, 1, true)
    -- acked: with prefetch 1 nothing more would be delivered
    local ok2, n2 = pcall(server.poll, server, 0)
    assert.is_true(ok2, "server:poll raised after the failure: " .. tostring(n2))
    assert.equal(0, n2)
    assert.equal("5 bytes, table", client:call("after", 5))
    assert.equal(1, handled)
    assert.equal(2, server:stats().requests)
    local count = H.amqp1 {op = "count", queue = queue}
    assert.equal(0, count.messages, "a request is left in the queue")
  end)

  it("out of memory recording a handler's first suspension answers its request with 'not enough memory' and never resumes it; the server serves on", function()
    local queue = H.queue("oom-adopt")
    -- a fresh state: the loop's tables are empty, so recording the first suspended thread
    -- allocates (a 24-byte node), and that allocation is made to fail
    local out, status, err = run_child([[
io.stdout:setvbuf("line")
local rpc, oom = require "rpc", require "oom"
local URL, QUEUE = os.getenv("RPC_URL"), os.getenv("SPEC_QUEUE")
local ran, resumed = 0, 0
local server = assert(rpc.server(QUEUE, function(body)
  ran = ran + 1
  if body == "first" then
    oom.fail_size(24, 2)   -- and the retry after the emergency collection
    coroutine.yield()   -- a bare yield: the loop records it, due again at once
    resumed = resumed + 1
  end
  return "done:" .. body
end, {url = URL, auto_delete = true, prefetch = 1}))
local client = assert(rpc.client(QUEUE, {url = URL, timeout = 5}))
local id = assert(client:send("first"))
local ok, n = pcall(server.poll, server, 5)
print("POLL", tostring(ok), tostring(n), "FAILURES", oom.off())
collectgarbage() collectgarbage()
print("FIRST", client:wait(id, 5))
print("SECOND", client:call("second", 5))
server:poll(0.2)
local stats = server:stats()
print("STATS", stats.in_progress, stats.requests, stats.replies, ran, resumed)
server:close()
client:close()
print("DONE")
]], {SPEC_QUEUE = queue})
    assert.equal(0, status, report(out, status, err))
    assert.matches("POLL\ttrue\t1\tFAILURES\t2\n", out, 1, false)
    local message = out:match("FIRST\tnil\t([^\n]*)\tremote\n")
    assert.is_string(message, "the first request was not answered with an error: " .. out)
    assert.matches("not enough memory", message, 1, true)
    assert.matches("SECOND\tdone:second\n", out, 1, true)
    -- nothing in progress, both answered, the first handler never resumed
    assert.matches("STATS\t0\t2\t2\t2\t0\n", out, 1, true)
    assert.matches("DONE", out, 1, true)
  end)

  it("out of memory for a reply inside client:call fails that call only: the client's next call succeeds", function()
    local oom = load_oom()
    local size = string_size(oom, BIG)
    local T = H.scope(finally)
    local queue = H.queue("oom-reply")
    local child = T:spawn {code = ([[
      local big = ("r"):rep(%d)
      local server = assert(rpc.server(QUEUE, function(body)
        if body == "big" then return big end
        return "re:" .. body
      end, {url = URL, auto_delete = true}))
      ready()
      server:run()
    ]]):format(BIG), queue = queue}
    child:wait_ready()
    local client = T:client(queue, {timeout = 5})
    assert.equal("re:warm", client:call("warm", 5))
    T:defer(oom.off)
    oom.fail_size(size)   -- the client's copy of the reply
    local ok, reply, message, kind = pcall(client.call, client, "big", 5)
    local failures = oom.off()
    assert.is_true(failures > 0, "no allocation of a " .. BIG .. "-byte string failed: the spec is wrong")
    if ok then   -- a failure returned: nil, message, kind
      assert.is_nil(reply)
      assert.is_string(message)
      assert.is_string(kind, message)
    else         -- or raised
      assert.matches("not enough memory", tostring(reply), 1, true)
    end
    local ok2, again = pcall(client.call, client, "again", 5)
    assert.is_true(ok2, "the next call raised: " .. tostring(again))
    assert.equal("re:again", again)
    assert.equal(("r"):rep(BIG), client:call("big", 5))
  end)

  it("out of memory for a message inside conn:receive fails that receive only: the connection's next receive gets a message", function()
    local oom = load_oom()
    local size = string_size(oom, BIG)
    local T = H.scope(finally)
    local rpc = require "rpc"
    local conn = assert(rpc.connect {url = H.URL})
    T:defer(function() conn:close() end)
    local queue = assert(conn:declare_queue("", {exclusive = true}))
    assert(conn:consume(queue, {ack = false}))
    -- published through another connection: this one reads nothing before its receive
    local pub = assert(rpc.connect {url = H.URL})
    T:defer(function() pub:close() end)
    local big = ("m"):rep(BIG)
    assert(pub:publish("", queue, big))
    assert(pub:publish("", queue, "small"))
    T:defer(oom.off)
    oom.fail_size(size)   -- the receive's copy of the body
    local ok, msg, message, kind = pcall(conn.receive, conn, 5)
    local failures = oom.off()
    assert.is_true(failures > 0, "no allocation of a " .. BIG .. "-byte string failed: the spec is wrong")
    if ok then
      assert.is_nil(msg)
      assert.is_string(message)
      assert.is_string(kind, message)
    else
      assert.matches("not enough memory", tostring(msg), 1, true)
    end
    -- the next receive works: "small", or the big message again if it was kept
    local bodies = {}
    for _ = 1, 2 do
      local ok2, m2, message2, kind2 = pcall(conn.receive, conn, 5)
      assert.is_true(ok2, "the next receive raised: " .. tostring(m2))
      assert.is_table(m2, ("the next receive got %s, %s, %s"):format(tostring(m2), tostring(message2), tostring(kind2)))
      bodies[#bodies + 1] = m2.body == big and "big" or m2.body
      if m2.body == "small" then break end
    end
    assert.equal("small", bodies[#bodies], "received: " .. table.concat(bodies, ", "))
    assert(pub:publish("", queue, "after"))
    local m3 = conn:receive(5)
    assert.is_table(m3)
    assert.equal("after", m3.body)
  end)

  it("after a raise escapes run(), SIGINT and SIGTERM do what they did before it", function()
    local size = string_size(load_oom(), BIG)
    local queue = H.queue("signals")
    local out, status, err = run_child(([[
io.stdout:setvbuf("line")
local rpc = require "rpc"
local oom = require "oom"
local URL, QUEUE, SIZE, BIG = os.getenv("RPC_URL"), os.getenv("SPEC_QUEUE"), %d, %d
local server
server = assert(rpc.server(QUEUE, function(body, request)
  if body == "stop" then server:stop() end
  return "ok"
end, {url = URL, auto_delete = true}))
local client = assert(rpc.client(QUEUE, {url = URL}))
-- Two ways for a raise to get out of run(), whichever comes first: no memory for this
-- request's body (where building it is not protected), and a call hook that raises once, at
-- the first C function called from C (not from Lua: server:run itself is called from Lua),
-- such as a protected step inside run(). Should neither get out, "stop" ends run().
assert(client:send(("b"):rep(BIG)))
assert(client:send("stop"))
oom.fail_size(SIZE)
local hooked
debug.sethook(function()
  if hooked then return end
  local called = debug.getinfo(2, "Sn")
  if called.what == "C" and called.name == nil then
    hooked = true
    error("raised by a call hook inside run()")
  end
end, "c")
local ok, err = pcall(function() return server:run() end)
debug.sethook()
oom.off()
print("RUN", tostring(ok), tostring(err))
local pid = io.open("/proc/self/stat"):read("a"):match("^(%%d+)")
-- lua.c's SIGINT handler turns Ctrl-C into an "interrupted!" error while a script runs (sent
-- from a background shell: os.execute ignores SIGINT while its command runs)
os.execute("(sleep 0.2; kill -INT " .. pid .. ") &")
local interrupted, message = pcall(function()
  local deadline = os.clock() + 3
  while os.clock() < deadline do end
end)
print("INT", interrupted and "ignored" or tostring(message))
os.execute("kill -TERM " .. pid)   -- at its default: the end of this process
local deadline = os.clock() + 1
while os.clock() < deadline do end
print("SURVIVED SIGTERM")
]]):format(size, BIG), {SPEC_QUEUE = queue})
    assert.equal(143, status, report(out, status, err))
    assert.matches("RUN\t", out, 1, true)
    assert.matches("INT\t[^\n]*interrupted!", out)
    assert.not_matches("SURVIVED", out, 1, true)
  end)
end)
