--- Helpers for the rabbitrpc specs: the broker URL, fresh queue names, child processes killed
-- by PID, waiting on conditions with deadlines, AMQP side doors through pika (amqp_tool.py) and
-- rabbitmqctl, and per-test cleanup through busted's finally().
--
-- Nothing here needs the rpc module: children load it themselves.
local json = require "dkjson"
local system = require "system"   -- luasystem, a busted dependency: monotime() and sleep()

local H = {}

-- ---- where things are ----

local function read_file(path)
  local f = io.open(path, "rb")
  if not f then return nil end
  local s = f:read("a")
  f:close()
  return s
end
H.read_file = read_file

local function write_file(path, s)
  local f = assert(io.open(path, "wb"))
  f:write(s)
  f:close()
end
H.write_file = write_file

--- Quotes s for sh.
local function q(s)
  return "'" .. tostring(s):gsub("'", [['\'']]) .. "'"
end
H.quote = q

H.ROOT = assert(io.popen("pwd")):read("l")   -- busted runs from the repo root (.busted is there)
H.LUA = "lua5.4"
-- make sanitize preloads gcc's ASan runtime into busted and names it in RPC_SPEC_PRELOAD: Lua
-- children get it too (they load the instrumented module); every other child (python3, sh,
-- rabbitmqctl and the Erlang nodes it starts) runs without it (env_words clears LD_PRELOAD).
H.PRELOAD = os.getenv("RPC_SPEC_PRELOAD")
if H.PRELOAD == "" then H.PRELOAD = nil end
if H.PRELOAD then H.LUA = "env LD_PRELOAD=" .. q(H.PRELOAD) .. " lua5.4" end
H.PYTHON = "/usr/bin/python3"                -- Debian's, which has pika; not whatever is on PATH
H.AMQP_TOOL = H.ROOT .. "/spec/support/amqp_tool.py"
H.BROKER = H.ROOT .. "/scripts/broker.sh"

-- The broker the specs use: env RPC_URL (the Makefile sets it), else the private broker.
H.URL = os.getenv("RPC_URL")
if not H.URL or H.URL == "" then H.URL = "amqp://guest:guest@localhost:5673/" end

do
  local user, password, host, port, vhost =
    H.URL:match("^amqp://([^:@/]*):([^@/]*)@([^:/]+):?(%d*)/?(.*)$")
  assert(user, "RPC_URL must look like amqp://user:password@host:port/vhost, got " .. H.URL)
  H.USER, H.PASSWORD, H.HOST = user, password, host
  H.PORT = tonumber(port) or 5672
  H.VHOST = vhost
  H.HOSTPORT = host .. ":" .. H.PORT
end
-- which node scripts/broker.sh ctl talks to (the Makefile exports it; else the URL's port)
H.BROKER_PORT = os.getenv("RPC_BROKER_PORT") or tostring(H.PORT)

--- The broker URL with some parts replaced: {user=, password=, host=, port=, vhost=}.
function H.url_with(parts)
  return ("amqp://%s:%s@%s:%s/%s"):format(parts.user or H.USER, parts.password or H.PASSWORD,
    parts.host or H.HOST, parts.port or H.PORT, parts.vhost or H.VHOST)
end

-- Child processes find the module the way busted does: in build/, or in the directory env
-- RPC_SPEC_BUILD names (make sanitize gives build-asan, and busted --cpath=build-asan/?.so).
H.LUA_PATH = H.ROOT .. "/lua/?.lua;" .. H.ROOT .. "/spec/?.lua;;"
H.BUILD = os.getenv("RPC_SPEC_BUILD") or "build"
if H.BUILD:sub(1, 1) ~= "/" then H.BUILD = H.ROOT .. "/" .. H.BUILD end
H.LUA_CPATH = H.BUILD .. "/?.so;;"

-- ---- time ----

H.now = system.monotime

function H.sleep(seconds)
  system.sleep(seconds)
end

--- Calls fn every 50 ms until it returns a truthy value, which it returns; raises (naming
-- what) when timeout seconds pass first.
function H.wait_until(fn, timeout, what)
  local deadline = H.now() + (timeout or 5)
  while true do
    local v = fn()
    if v then return v end
    if H.now() > deadline then
      error(("timed out after %s s waiting for %s"):format(timeout or 5, what or "a condition"), 2)
    end
    H.sleep(0.05)
  end
end

--- Runs fn(...) and returns the seconds it took, then its results.
function H.timed(fn, ...)
  local t0 = H.now()
  local r = table.pack(fn(...))
  return H.now() - t0, table.unpack(r, 1, r.n)
end

-- ---- names ----

function H.hex(bytes)
  local f = assert(io.open("/dev/urandom", "rb"))
  local s = f:read(bytes or 6)
  f:close()
  return (s:gsub(".", function(c) return ("%02x"):format(c:byte()) end))
end

local queues = {}   -- every name handed out, deleted by H.delete_queues()

--- A fresh queue name, "spec-<what>-<random hex>".
function H.queue(what)
  local name = "spec-" .. (what and what .. "-" or "") .. H.hex(6)
  queues[#queues + 1] = name
  return name
end

--- Deletes every queue H.queue named: one pika connection, errors ignored.
function H.delete_queues()
  if #queues == 0 then return end
  local ops = {}
  for i, name in ipairs(queues) do ops[i] = {op = "delete", queue = name} end
  queues = {}
  pcall(H.amqp, ops)
end

--- For each spec file's teardown: deletes its queues and its scratch files.
function H.cleanup()
  H.delete_queues()
  H.remove_tmpdir()
end

-- ---- this process ----

function H.pid()
  return tonumber(assert(read_file("/proc/self/stat")):match("^(%d+)"))
end

function H.rss_kb()
  return tonumber(assert(read_file("/proc/self/status")):match("VmRSS:%s*(%d+)"))
end

--- Local ports of this process's established TCP connections to the broker, sorted.
function H.broker_ports()
  local inodes = {}
  local p = assert(io.popen("ls -l /proc/" .. H.pid() .. "/fd 2>/dev/null"))
  for inode in p:read("a"):gmatch("socket:%[(%d+)%]") do inodes[inode] = true end
  p:close()
  local ports = {}
  for _, file in ipairs {"/proc/net/tcp", "/proc/net/tcp6"} do
    for line in (read_file(file) or ""):gmatch("[^\n]+") do
      local lport, rport, state, inode = line:match(
        "^%s*%d+:%s+%x+:(%x+)%s+%x+:(%x+)%s+(%x+)%s+%S+%s+%S+%s+%S+%s+%d+%s+%d+%s+(%d+)")
      if inode and inodes[inode] and tonumber(rport, 16) == H.PORT and state == "01" then
        ports[#ports + 1] = tonumber(lport, 16)
      end
    end
  end
  table.sort(ports)
  return ports
end

--- The ports in after that are not in before.
function H.new_ports(before, after)
  local seen, new = {}, {}
  for _, p in ipairs(before) do seen[p] = true end
  for _, p in ipairs(after) do if not seen[p] then new[#new + 1] = p end end
  return new
end

function H.contains(list, value)
  for _, v in ipairs(list) do if v == value then return true end end
  return false
end

-- ---- running commands ----

local tmpdir
--- This run's scratch directory.
function H.tmpdir()
  if not tmpdir then
    tmpdir = assert(io.popen("mktemp -d /tmp/rabbitrpc-spec.XXXXXX")):read("l")
    assert(tmpdir and tmpdir ~= "", "mktemp -d failed")
  end
  return tmpdir
end

function H.remove_tmpdir()
  if tmpdir then os.execute("rm -rf " .. q(tmpdir)) end
  tmpdir = nil
end

local counter = 0
local function fresh_dir(what)
  counter = counter + 1
  local dir = ("%s/%s%d"):format(H.tmpdir(), what, counter)
  assert(os.execute("mkdir -p " .. q(dir)))
  return dir
end

--- "env K='v' ..." for a child: the module paths and the broker, plus env (a table).
local function env_words(env)
  local all = {LUA_PATH_5_4 = H.LUA_PATH, LUA_CPATH_5_4 = H.LUA_CPATH, RPC_URL = H.URL,
               RPC_BROKER_PORT = H.BROKER_PORT, LD_PRELOAD = H.PRELOAD and ""}
  for k, v in pairs(env or {}) do all[k] = v end
  local words = {}
  for k, v in pairs(all) do words[#words + 1] = k .. "=" .. q(v) end
  table.sort(words)
  return table.concat(words, " ")
end

--- Runs a shell command line to completion with env (a table) added. Returns its standard
-- output, its exit status (a number; 128 + n for signal n) and its standard error.
function H.run(cmd, env)
  counter = counter + 1
  local err = ("%s/stderr%d"):format(H.tmpdir(), counter)
  local p = assert(io.popen(("env %s %s 2>%s </dev/null"):format(env_words(env), cmd, q(err))))
  local out = p:read("a")
  local ok, how, code = p:close()
  local errors = read_file(err) or ""
  os.remove(err)
  local status = ok and 0 or (how == "signal" and 128 + code or code)
  return out, status, errors
end

--- Runs Lua code in a fresh lua5.4 (module paths set). Returns output, status, stderr.
function H.run_lua(code, env)
  local dir = fresh_dir("lua")
  write_file(dir .. "/main.lua", code)
  return H.run(H.LUA .. " " .. q(dir .. "/main.lua"), env)
end

--- Runs a pika-side list of AMQP operations (see amqp_tool.py) and returns the list of results,
-- one table per operation ({error = code, text = ...} for one the broker refused).
-- Bodies must be ASCII (they travel as JSON on the command line).
function H.amqp(ops)
  local out, status, err = H.run(H.PYTHON .. " " .. q(H.AMQP_TOOL) .. " ops " .. q(json.encode(ops)))
  if status ~= 0 then error("amqp_tool.py failed (" .. status .. "): " .. err .. out, 2) end
  local results = json.decode(out)
  if type(results) ~= "table" then error("amqp_tool.py printed no results: " .. out .. err, 2) end
  return results
end

--- One operation of H.amqp: its result.
function H.amqp1(op)
  return H.amqp({op})[1]
end

--- rabbitmqctl against the spec broker (scripts/broker.sh ctl ARGS). Returns output, status.
function H.ctl(...)
  local words = {}
  for i, a in ipairs {...} do words[i] = q(a) end
  local out, status, err = H.run(q(H.BROKER) .. " ctl " .. table.concat(words, " "))
  return out .. err, status
end

--- Peer ports of the broker's client connections, as rabbitmqctl lists them, plus a map from
-- peer port to the connection's Erlang pid (what close_connection takes).
function H.broker_connections()
  local out, status = H.ctl("list_connections", "peer_port", "pid")
  assert(status == 0, "rabbitmqctl list_connections failed: " .. out)
  local ports, pids = {}, {}
  for line in out:gmatch("[^\n]+") do
    local port, pid = line:match("^%s*(%d+)%s+(<[^>]+>)%s*$")
    if port then
      ports[#ports + 1] = tonumber(port)
      pids[tonumber(port)] = pid
    end
  end
  return ports, pids
end

-- ---- child processes ----

-- What every Lua child (H.spawn{code = ...}) starts with: rpc loaded, and a few names.
local PRELUDE = [[
io.stdout:setvbuf("line")
rpc = require "rpc"
system = require "system"
URL, QUEUE, DIR = os.getenv("RPC_URL"), os.getenv("SPEC_QUEUE"), os.getenv("SPEC_DIR")
function touch(name) local f = assert(io.open(DIR .. "/" .. name, "w")); f:close() end
function ready() touch("ready") end   -- call once the server is declared and consuming
function sleep(seconds) system.sleep(seconds) end   -- luasystem resumes a nanosleep after EINTR
]]

local Child = {}
Child.__index = Child

--- Starts a child process in the background and returns it once its PID is known.
-- spec: one of code (Lua source run after PRELUDE), script (a Lua file, relative to the repo
-- root), python (a file run with /usr/bin/python3) or sh (a shell command line); args (list),
-- env (table), queue (given as RPC_QUEUE and SPEC_QUEUE). The child's standard output and
-- error go to a file (child:output()); SIGINT/SIGQUIT/SIGTERM are at their defaults in it
-- even though sh starts background jobs with SIGINT ignored.
function H.spawn(spec)
  local dir = fresh_dir("child")
  local argv
  if spec.code then
    write_file(dir .. "/main.lua", PRELUDE .. spec.code)
    argv = H.LUA .. " " .. q(dir .. "/main.lua")
  elseif spec.script then
    argv = H.LUA .. " " .. q(H.ROOT .. "/" .. spec.script)
  elseif spec.python then
    argv = H.PYTHON .. " -u " .. q(spec.python)
  elseif spec.sh then
    argv = "sh -c " .. q(spec.sh)
  else
    error("H.spawn: code, script, python or sh expected", 2)
  end
  for _, a in ipairs(spec.args or {}) do argv = argv .. " " .. q(a) end
  local env = {SPEC_DIR = dir, RPC_QUEUE = spec.queue, SPEC_QUEUE = spec.queue}
  for k, v in pairs(spec.env or {}) do env[k] = v end
  -- sh -c records its own PID, then execs (keeping the PID) env, which execs the program;
  -- the subshell around it waits and records the exit status.
  local inner = ("echo $$ > %s; exec env --default-signal=INT,QUIT,TERM %s %s")
    :format(q(dir .. "/pid"), env_words(env), argv)
  local outer = ("( sh -c %s > %s 2>&1 < /dev/null; echo $? > %s; mv %s %s ) > /dev/null 2>&1 < /dev/null &")
    :format(q(inner), q(dir .. "/out"), q(dir .. "/status.tmp"), q(dir .. "/status.tmp"),
            q(dir .. "/status"))
  assert(os.execute(outer))
  local child = setmetatable({dir = dir, name = spec.name}, Child)
  child.pid = H.wait_until(function()
    return tonumber(read_file(dir .. "/pid") or "")
  end, 5, "the child's pid")
  return child
end

function Child:output()
  return read_file(self.dir .. "/out") or ""
end

--- The exit status (128 + n when killed by signal n), or nil while it runs.
function Child:status()
  self.exit_status = self.exit_status or tonumber(read_file(self.dir .. "/status") or "")
  return self.exit_status
end

function Child:file_exists(name)
  local f = io.open(self.dir .. "/" .. name)
  if f then f:close() end
  return f ~= nil
end

local function check_alive(child, what)
  local status = child:status()
  if status then
    error(("the child exited (status %d) before %s; its output:\n%s")
      :format(status, what, child:output()), 3)
  end
end

--- Waits until the child has touched file name (default "ready"); raises if it exits first.
function Child:wait_file(name, timeout)
  name = name or "ready"
  H.wait_until(function()
    check_alive(self, "touching " .. name)
    return self:file_exists(name)
  end, timeout or 10, "the child to touch " .. name .. "; its output:\n" .. self:output())
  return self
end

function Child:wait_ready(timeout)
  return self:wait_file("ready", timeout)
end

--- Waits until the child's output matches pattern; raises if it exits first.
function Child:wait_output(pattern, timeout)
  return H.wait_until(function()
    local out = self:output()
    if out:find(pattern) then return out end
    check_alive(self, "printing " .. pattern)
  end, timeout or 10, ("output matching %q from the child"):format(pattern))
end

--- Sends signal sig ("TERM", "INT", "KILL", ...) to the child's PID, unless it has exited
-- (its PID may be someone else's by now).
function Child:kill(sig)
  if self:status() then return end
  os.execute(("kill -%s %d 2>/dev/null"):format(sig or "TERM", self.pid))
end

--- Waits up to timeout seconds for the child to exit: its status, or nil.
function Child:wait(timeout)
  local deadline = H.now() + (timeout or 5)
  repeat
    local status = self:status()
    if status then return status end
    H.sleep(0.02)
  until H.now() > deadline
  return nil
end

--- Cleanup: TERM, then KILL if it lingers; removes its files. Idempotent.
function Child:stop()
  if self.stopped then return end
  self.stopped = true
  if not self:status() then
    self:kill("TERM")
    if not self:wait(3) then
      self:kill("KILL")
      self:wait(3)
    end
  end
  os.execute("rm -rf " .. q(self.dir))
end

-- ---- per-test cleanup ----

local Scope = {}
Scope.__index = Scope

--- Cleanup for one `it`: pass busted's finally. Everything made through the scope is closed
-- or stopped at the end of the test, newest first, even when the test fails.
--   local T = H.scope(finally)
--   local server = T:server(queue, handler); local client = T:client(queue)
function H.scope(finally)
  local scope = setmetatable({undo = {}}, Scope)
  finally(function() scope:close() end)
  return scope
end

function Scope:defer(fn)
  self.undo[#self.undo + 1] = fn
  return fn
end

function Scope:close()
  local first_error
  for i = #self.undo, 1, -1 do
    local ok, err = pcall(self.undo[i])
    if not ok and not first_error then first_error = err end
  end
  self.undo = {}
  if first_error then error(first_error, 0) end
end

--- opts with url defaulting to the spec broker (unless urls is given).
function H.opts(opts)
  local t = {url = H.URL}
  for k, v in pairs(opts or {}) do t[k] = v end
  if t.urls then t.url = nil end  -- the two do not go together
  return t
end

--- A connected client (raises with the message and kind when rpc.client fails).
function Scope:client(queue, opts)
  local rpc = require "rpc"
  local client, message, kind = rpc.client(queue, H.opts(opts))
  if not client then error(("rpc.client failed: %s (%s)"):format(message, kind), 2) end
  self:defer(function() client:close() end)
  return client
end

--- A declared, consuming server in this Lua state.
function Scope:server(queue, handler, opts)
  local rpc = require "rpc"
  local server, message, kind = rpc.server(queue, handler, H.opts(opts))
  if not server then error(("rpc.server failed: %s (%s)"):format(message, kind), 2) end
  self:defer(function() server:close() end)
  return server
end

function Scope:spawn(spec)
  local child = H.spawn(spec)
  self:defer(function() child:stop() end)
  return child
end

--- A TCP proxy to the spec broker (spec/support/proxy.py): the child and its port.
function Scope:proxy()
  local proxy = self:spawn {python = H.ROOT .. "/spec/support/proxy.py", args = {"0", tostring(H.PORT)}}
  return proxy, tonumber(proxy:wait_output("ready (%d+)"):match("ready (%d+)"))
end

--- A child that sends SIGTERM to this process after seconds: a guard around server:run() in
-- the busted process (run returns on SIGTERM). Stop it (child:stop()) as soon as run returns.
function Scope:watchdog(seconds)
  -- one process (no orphaned sleep once it is stopped)
  return self:spawn {code = ("sleep(%s) os.execute('kill -TERM %d')"):format(seconds, H.pid())}
end

-- ---- assertions ----

--- Calls fn (which must not tail-call the function under test: a tail call loses the name
-- luaL_argerror reports) and returns the error it raised; fails if it returned.
function H.error_of(fn)
  local ok, err = pcall(fn)
  assert(not ok, "expected an error, but the call returned")
  return tostring(err)
end

--- Fails if s shows the password of url (the user name may appear).
function H.assert_no_password(s, url)
  url = url or H.URL
  local user, password = url:match("^amqps?://([^:@/]*):([^@/]*)@")
  if password == "" then return end
  if password ~= user then
    assert(not s:find(password, 1, true), ("the password shows in %q"):format(s))
  else  -- the same word: it may show once, as the user
    assert(not s:find(user .. ":" .. password, 1, true), ("the password shows in %q"):format(s))
    local _, count = s:gsub(password:gsub("%p", "%%%0"), "")
    assert(count <= 1, ("the password shows in %q"):format(s))
  end
end

H.UUID = "^%x%x%x%x%x%x%x%x%-%x%x%x%x%-%x%x%x%x%-%x%x%x%x%-%x%x%x%x%x%x%x%x%x%x%x%x$"

return H
