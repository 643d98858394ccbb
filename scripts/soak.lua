-- rabbitrpc soak: several client processes pipelining calls to two server processes for N
-- minutes while the broker's app is restarted and every connection is killed now and then.
--   lua5.4 scripts/soak.lua [--minutes M] [--clients N] [--inflight N] [--fault-every S]
--                           [--timeout S] [--queue NAME]
-- (env SOAK_MINUTES sets the default of --minutes). Needs RPC_URL and a broker started with
-- scripts/broker.sh start, and `make` (the module is taken from this checkout).
-- Exit status 1 if any call was lost, any reply was wrong or duplicated, or a process died.
-- The same file is the child processes: --role server|client (started by the driver).
local system = require "system"
local now, sleep = system.monotime, system.sleep

local function parse_args(list)
  local o, i = {}, 1
  while i <= #list do
    local k = list[i]:match("^%-%-([%w-]+)$")
    if not k or list[i + 1] == nil then
      io.stderr:write("soak: bad argument '", list[i], "' (options are --name value)\n")
      os.exit(2)
    end
    o[k] = list[i + 1]
    i = i + 2
  end
  return o
end

local args = parse_args(arg)

local function num(k, default)
  local v = args[k]
  if v == nil then return default end
  local n = tonumber(v)
  if not n or n <= 0 then io.stderr:write("soak: --", k, " wants a positive number\n"); os.exit(2) end
  return n
end

-- RSS in kB (VmRSS) and the number of open fds of a process, or nil if it is gone
local function measure(pid)
  local f = io.open("/proc/" .. pid .. "/status")
  if not f then return nil end
  local status = f:read("a")
  f:close()
  if status:match("\nState:%s+Z") then return nil end
  local rss = tonumber(status:match("VmRSS:%s+(%d+)"))
  local p = io.popen("ls /proc/" .. pid .. "/fd 2>/dev/null | wc -l")
  local fds = tonumber(p:read("a"))
  p:close()
  if not rss then return nil end
  return {rss = rss, fds = fds}
end

local function log_stderr(line) io.stderr:write(os.date("%H:%M:%S "), line, "\n"); io.stderr:flush() end

---------------------------------------------------------------------------------------- server
local function run_server()
  local rpc = require "rpc"
  local queue = assert(args.queue, "--queue")
  local server, msg, kind
  local deadline = now() + 60
  repeat   -- the broker may be restarting while we start
    server, msg, kind = rpc.server(queue, function(body) return "R:" .. body end,
      {prefetch = 10, durable = false, log = log_stderr})
    if not server then log_stderr("rpc.server: " .. kind .. ": " .. msg); sleep(0.5) end
  until server or now() > deadline
  if not server then os.exit(3) end
  print("ready"); io.stdout:flush()
  local ok, m, k = server:run()
  local s = server:stats()
  print(string.format("result requests=%d replies=%d errors=%d reconnects=%d run=%s",
    s.requests, s.replies, s.errors, s.reconnects, ok and "ok" or (tostring(k) .. ":" .. tostring(m))))
  io.stdout:flush()
  server:close()
end

---------------------------------------------------------------------------------------- client
local function run_client()
  local rpc = require "rpc"
  local queue = assert(args.queue, "--queue")
  local cid = assert(args.id, "--id")
  local seconds = num("seconds", 60)
  local inflight = math.floor(num("inflight", 10))
  local timeout = num("timeout", 5)
  local slack = 1
  local stop_at = now() + seconds

  local c = {attempted = 0, replied = 0, wrong = 0, lost = 0, duplicated = 0, late = 0, max_ms = 0}
  local failed = {}
  local function fail(kind) failed[kind] = (failed[kind] or 0) + 1 end

  local client, msg, kind
  repeat
    client, msg, kind = rpc.client(queue, {timeout = timeout})
    if not client then fail("connect:" .. tostring(kind)); sleep(0.5) end
  until client or now() > stop_at
  if not client then
    print("result died=no_client " .. tostring(msg)); io.stdout:flush(); os.exit(3)
  end

  -- bodies: "c<cid>:n<seq>:" then padding; mostly small, some 64 KiB, now and then 300 KiB
  local pad = string.rep("abcdefghijklmnopqrstuvwxyz0123456789", 300 * 1024 // 36 + 1)
  local sizes = {16, 16, 16, 1024, 1024, 1024, 65536}
  local seq = 0
  local function make_body()
    seq = seq + 1
    local size = (seq % 97 == 0) and 300 * 1024 or sizes[seq % #sizes + 1]
    local head = "c" .. cid .. ":n" .. seq .. ":"
    return seq, head .. pad:sub(1, math.max(0, size - #head))
  end

  -- seqs answered so far, as a bitset (64 per integer) so the set barely moves the RSS
  local bits = {}
  local function answered(n) return ((bits[n >> 6] or 0) >> (n & 63)) & 1 == 1 end
  local function set_answered(n) bits[n >> 6] = (bits[n >> 6] or 0) | (1 << (n & 63)) end
  local ring, head, tail = {}, 1, 0   -- FIFO of {id, seq, body, t0}

  local function check(entry, reply, m, k)
    local ms = (now() - entry.t0) * 1000
    if ms > c.max_ms then c.max_ms = ms end
    if ms > (timeout + slack) * 1000 then c.lost = c.lost + 1; c.late = c.late + 1 end
    if reply == nil then
      fail(tostring(k))
      return
    end
    if reply == "R:" .. entry.body then
      if answered(entry.seq) then c.duplicated = c.duplicated + 1 end
      set_answered(entry.seq)
      c.replied = c.replied + 1
      return
    end
    -- a wrong reply: whose is it?
    c.wrong = c.wrong + 1
    c.lost = c.lost + 1
    local rc, rn = reply:match("^R:c([^:]*):n(%d+):")
    rn = tonumber(rn)
    if rc == cid and rn and answered(rn) then c.duplicated = c.duplicated + 1 end
    log_stderr(string.format("WRONG reply for c%s:n%d (%d bytes): got %d bytes starting %q",
      cid, entry.seq, #entry.body, #reply, reply:sub(1, 40)))
  end

  local warm_at, heap_start = now() + math.min(5, seconds / 10), nil
  while true do
    if not heap_start and now() >= warm_at then heap_start = collectgarbage("count") end
    local running = now() < stop_at
    -- fill the ring
    while running and tail - head + 1 < inflight do
      local s, body = make_body()
      c.attempted = c.attempted + 1
      local t0 = now()
      local id, m, k = client:send(body, {timeout = timeout})
      if not id then
        fail(tostring(k))
        sleep(0.05)   -- back off before trying again
        break
      end
      tail = tail + 1
      ring[tail] = {id = id, seq = s, body = body, t0 = t0}
    end
    if tail < head then
      if not running then break end
      sleep(0.05)
    else
      local e = ring[head]
      ring[head] = nil
      head = head + 1
      local ok, reply, m, k = pcall(client.wait, client, e.id)
      if not ok then
        fail("raised")
        c.lost = c.lost + 1
        log_stderr("wait raised: " .. tostring(reply))
      else
        check(e, reply, m, k)
      end
    end
  end

  local parts = {}
  for _, k in ipairs({"attempted", "replied", "wrong", "lost", "duplicated", "late"}) do
    parts[#parts + 1] = k .. "=" .. c[k]
  end
  parts[#parts + 1] = string.format("max_ms=%.0f", c.max_ms)
  local heap_end = collectgarbage("count")
  parts[#parts + 1] = string.format("lua_kb=%.0f->%.0f", heap_start or heap_end, heap_end)
  local st = client:stats()
  parts[#parts + 1] = "discarded=" .. tostring(st.discarded)
  for k, n in pairs(failed) do parts[#parts + 1] = "failed." .. k .. "=" .. n end
  print("result " .. table.concat(parts, " "))
  io.stdout:flush()
  -- stay alive (client open) so the driver can measure RSS/fds at the end; it kills us
  local idle_until = now() + 120
  while now() < idle_until do sleep(0.5) end
end

---------------------------------------------------------------------------------------- driver
local function sh_quote(s) return "'" .. tostring(s):gsub("'", "'\\''") .. "'" end

local function read_file(path)
  local f = io.open(path)
  if not f then return "" end
  local s = f:read("a")
  f:close()
  return s
end

local function run_driver()
  local minutes = num("minutes", tonumber(os.getenv("SOAK_MINUTES") or "") or 5)
  local nclients = math.floor(num("clients", 3))
  local inflight = math.floor(num("inflight", 10))
  local fault_every = num("fault-every", 20)
  local timeout = num("timeout", 5)
  local seconds = minutes * 60
  local url = os.getenv("RPC_URL")
  if not url then
    io.stderr:write("soak: set RPC_URL (e.g. amqp://guest:guest@localhost:5673/) and run scripts/broker.sh start\n")
    os.exit(2)
  end
  local root = arg[0]:match("^(.*)/scripts/soak%.lua$") or "."
  local p = io.popen("cd " .. sh_quote(root) .. " && pwd"); root = p:read("l"); p:close()
  local broker = sh_quote(root .. "/scripts/broker.sh")
  p = io.popen("mktemp -d /tmp/rabbitrpc-soak.XXXXXX"); local dir = p:read("l"); p:close()
  local queue = args.queue or ("soak-" .. dir:match("([^.]+)$"))
  local env = "LUA_PATH_5_4=" .. sh_quote(root .. "/lua/?.lua;;") ..
    " LUA_CPATH_5_4=" .. sh_quote(root .. "/build/?.so;;")
  local self = sh_quote(root .. "/scripts/soak.lua")

  local t0 = now()
  local function say(fmt, ...)
    io.stdout:write(string.format("[%6.1fs] " .. fmt .. "\n", now() - t0, ...)); io.stdout:flush()
  end

  local procs = {}
  local function spawn(name, role, extra)
    local out, err = dir .. "/" .. name .. ".out", dir .. "/" .. name .. ".err"
    local cmd = env .. " exec lua5.4 " .. self .. " --role " .. role .. " --queue " .. sh_quote(queue) ..
      " " .. extra .. " > " .. sh_quote(out) .. " 2> " .. sh_quote(err) .. " < /dev/null"
    local ph = io.popen("sh -c " .. sh_quote(cmd) .. " & echo $!")
    local pid = tonumber(ph:read("l")); ph:close()
    assert(pid, "could not start " .. name)
    local pr = {name = name, role = role, pid = pid, out = out, err = err}
    procs[#procs + 1] = pr
    return pr
  end
  local function ours(pr)   -- still our child (not a reused pid)?
    local cmdline = read_file("/proc/" .. pr.pid .. "/cmdline")
    return cmdline:find("soak.lua", 1, true) and cmdline:find(queue, 1, true)
  end
  local function alive(pr) return ours(pr) and measure(pr.pid) ~= nil end
  local function kill_all()
    for _, pr in ipairs(procs) do
      if alive(pr) then os.execute("kill -TERM " .. pr.pid .. " 2>/dev/null") end
    end
    local deadline = now() + 5
    while now() < deadline do
      local any = false
      for _, pr in ipairs(procs) do if alive(pr) then any = true end end
      if not any then break end
      sleep(0.1)
    end
    for _, pr in ipairs(procs) do
      if alive(pr) then say("%s (pid %d) ignored SIGTERM: SIGKILL", pr.name, pr.pid)
        os.execute("kill -KILL " .. pr.pid .. " 2>/dev/null") end
    end
  end

  local function main()
    say("soak: %.2f min, %d clients x %d in flight, 2 servers, queue %s, faults every %gs, logs in %s",
      minutes, nclients, inflight, queue, fault_every, dir)
    local servers = {spawn("server1", "server", ""), spawn("server2", "server", "")}
    local deadline = now() + 60
    for _, s in ipairs(servers) do
      while not read_file(s.out):find("ready", 1, true) do
        if now() > deadline or not alive(s) then
          error(s.name .. " did not start: " .. read_file(s.err))
        end
        sleep(0.1)
      end
    end
    say("servers ready: pids %d %d", servers[1].pid, servers[2].pid)
    local clients = {}
    for i = 1, nclients do
      clients[i] = spawn("client" .. i, "client", string.format("--id %d --seconds %g --inflight %d --timeout %g",
        i, seconds, inflight, timeout))
    end
    local t_run = now()
    local warmup = math.min(5, seconds / 10)
    local next_fault, fault_n, measured = t_run + fault_every, 0, false
    local faults = {}
    while now() < t_run + seconds do
      if not measured and now() >= t_run + warmup then
        for _, pr in ipairs(procs) do pr.start = measure(pr.pid) end
        measured = true
        say("warm-up done: measured RSS/fds")
      end
      if now() >= next_fault and now() < t_run + seconds - 3 then
        fault_n = fault_n + 1
        if fault_n % 2 == 1 then
          say("fault %d: broker app restart (stop_app, 2 s, start_app)", fault_n)
          os.execute(broker .. " ctl -q stop_app > /dev/null")
          sleep(2)
          os.execute(broker .. " ctl -q start_app > /dev/null")
          faults[#faults + 1] = "restart"
        else
          local ph = io.popen(broker .. " ctl -q list_connections --no-table-headers pid 2>/dev/null")
          local pids = {}
          for line in ph:lines() do
            local cp = line:match("^%s*(<%S+>)%s*$")
            if cp then pids[#pids + 1] = cp end
          end
          ph:close()
          say("fault %d: killing %d connections", fault_n, #pids)
          local cmds = {}
          for _, cp in ipairs(pids) do
            cmds[#cmds + 1] = broker .. " ctl -q close_connection " .. sh_quote(cp) .. " soak > /dev/null 2>&1 &"
          end
          if #cmds > 0 then os.execute(table.concat(cmds, " ") .. " wait") end
          faults[#faults + 1] = "kill_connections(" .. #pids .. ")"
        end
        say("fault %d done", fault_n)
        next_fault = next_fault + fault_every
        if next_fault < now() then next_fault = now() + 1 end
      end
      sleep(0.2)
    end
    if not measured then for _, pr in ipairs(procs) do pr.start = measure(pr.pid) end end
    say("duration over: waiting for the clients' last calls")
    -- the clients end on their own; the last wait ends within timeout + slack
    deadline = now() + timeout + 1 + 10
    local died = {}
    for _, cpr in ipairs(clients) do
      while not read_file(cpr.out):find("result", 1, true) do
        if now() > deadline then died[#died + 1] = cpr.name .. " (no result: hung)"; break end
        if not alive(cpr) then sleep(0.2)   -- it may just have written it
          if not read_file(cpr.out):find("result", 1, true) then
            died[#died + 1] = cpr.name .. " (died)"; break end
        end
        sleep(0.1)
      end
    end
    for _, pr in ipairs(procs) do
      pr.finish = alive(pr) and measure(pr.pid) or nil
      if not pr.finish and pr.role == "server" then died[#died + 1] = pr.name .. " (died)" end
    end
    kill_all()
    for _, s in ipairs(servers) do   -- servers print their stats on SIGTERM
      local d = now() + 2
      while not read_file(s.out):find("result", 1, true) and now() < d do sleep(0.1) end
    end
    os.execute(broker .. " ctl -q delete_queue " .. sh_quote(queue) .. " > /dev/null 2>&1")

    -- totals
    local total = {attempted = 0, replied = 0, wrong = 0, lost = 0, duplicated = 0, late = 0, discarded = 0}
    local failed, max_ms = {}, 0
    print()
    print(string.format("%-8s %7s %10s %10s %9s %6s %6s %5s %7s %8s  %s", "process", "pid", "attempted", "replied",
      "failed", "lost", "wrong", "dup", "max_ms", "discard", "failed by kind"))
    for _, cpr in ipairs(clients) do
      local line = read_file(cpr.out):match("result ([^\n]*)") or ""
      local r, nf, kinds = {}, 0, {}
      for k, v in line:gmatch("(%S+)=(%S+)") do
        local fk = k:match("^failed%.(.+)$")
        if fk then
          failed[fk] = (failed[fk] or 0) + tonumber(v); nf = nf + tonumber(v)
          kinds[#kinds + 1] = fk .. "=" .. v
        elseif k == "lua_kb" then cpr.lua_kb = v
      else r[k] = tonumber(v) end
      end
      for k in pairs(total) do total[k] = total[k] + (r[k] or 0) end
      if (r.max_ms or 0) > max_ms then max_ms = r.max_ms end
      table.sort(kinds)
      print(string.format("%-8s %7d %10d %10d %9d %6d %6d %5d %7d %8d  %s", cpr.name, cpr.pid, r.attempted or 0,
        r.replied or 0, nf, r.lost or 0, r.wrong or 0, r.duplicated or 0, r.max_ms or 0, r.discarded or 0,
        table.concat(kinds, " ")))
    end
    for _, s in ipairs(servers) do
      print(string.format("%-8s %7d  %s", s.name, s.pid, (read_file(s.out):match("result ([^\n]*)") or "(no stats)")))
    end
    print()
    print(string.format("%-8s %7s %22s %14s   %s", "process", "pid", "RSS kB start -> end", "fds start->end",
      "Lua heap kB (clients)"))
    for _, pr in ipairs(procs) do
      local a, b = pr.start, pr.finish
      print(string.format("%-8s %7d %10s -> %-9s %5s -> %-5s   %s", pr.name, pr.pid, a and a.rss or "-",
        b and b.rss or "-", a and a.fds or "-", b and b.fds or "-", pr.lua_kb or ""))
    end
    print()
    print("faults: " .. (#faults > 0 and table.concat(faults, ", ") or "none"))
    local nfailed, kinds = 0, {}
    for k, v in pairs(failed) do nfailed = nfailed + v; kinds[#kinds + 1] = k .. "=" .. v end
    table.sort(kinds)
    local accounted = total.replied + nfailed + total.wrong
    if accounted ~= total.attempted then
      print(string.format("note: attempted %d but replied + failed + wrong = %d", total.attempted, accounted))
    end
    if #died > 0 then print("died: " .. table.concat(died, ", ")) end
    print(string.format("soak: %.1f min, attempted %d, replied %d, failed %d {%s}, lost %d, wrong %d, duplicated %d, " ..
      "late %d, max call %d ms, discarded %d, processes died %d", minutes, total.attempted, total.replied, nfailed,
      table.concat(kinds, ", "), total.lost, total.wrong, total.duplicated, total.late, max_ms, total.discarded, #died))
    local bad = total.lost > 0 or total.wrong > 0 or total.duplicated > 0 or #died > 0 or total.attempted == 0
    print(bad and "soak: FAILED" or "soak: OK")
    return bad and 1 or 0
  end

  local ok, rc = xpcall(main, debug.traceback)
  if not ok then
    io.stderr:write("soak: ", tostring(rc), "\n")
    kill_all()
    os.exit(2)
  end
  os.exit(rc)
end

if args.role == "server" then run_server()
elseif args.role == "client" then run_client()
else run_driver() end
