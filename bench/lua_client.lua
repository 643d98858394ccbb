-- rabbitrpc echo client for the bench, written with the public API.
--   RPC_URL=... lua5.4 bench/lua_client.lua QUEUE MODE INFLIGHT WARMUP MEASURE SERVER_PID [BROKER_PID]
-- The same arguments and JSON line as raw_client.c (see there). INFLIGHT 1 uses client:call;
-- more keeps that many in flight with client:send and client:wait (a ring of ids: wait the
-- oldest, send one more). Env BENCH_CLK_TCK: the kernel's clock ticks per second (100).
package.path = arg[0]:gsub("[^/]*$", "") .. "../lua/?.lua;" .. package.path     -- run from a checkout
package.cpath = arg[0]:gsub("[^/]*$", "") .. "../build/?.so;" .. package.cpath
local rpc = require "rpc"
local monotime = require "system".monotime

local BODY = "0123456789abcdef"
local TIMEOUT = 30      -- seconds: expiration "30000", as the other clients
local CLK_TCK = tonumber(os.getenv("BENCH_CLK_TCK")) or 100

local queue, mode, inflight, warmup, measure, server_pid, broker_pid = table.unpack(arg, 1, 7)
inflight = tonumber(inflight)
assert(queue and mode and inflight and warmup and measure and server_pid,
       "usage: lua_client.lua QUEUE direct|exclusive INFLIGHT WARMUP MEASURE SERVER_PID [BROKER_PID]")

-- "2.5s" (seconds) or "1000" (calls): a function telling whether it is reached
local function amount(text)
  local seconds, calls = tonumber(text:match("^(.+)s$")), tonumber(text)
  assert(seconds or calls, "bad amount '" .. text .. "' (2.5s or 1000)")
  return function(elapsed, n)
    if seconds then return elapsed >= seconds end
    return n >= calls
  end
end
local warmed, done = amount(warmup), amount(measure)

-- ---- /proc ----

local function read_file(path)
  local f = assert(io.open(path))
  local text = f:read("a")
  f:close()
  return text
end

local function proc_cpu(pid)   -- utime + stime, seconds
  local fields = {}
  for word in read_file("/proc/" .. pid .. "/stat"):match("%)%s+(.*)$"):gmatch("%S+") do
    fields[#fields + 1] = word
  end
  return (tonumber(fields[12]) + tonumber(fields[13])) / CLK_TCK
end

local function proc_kb(pid, field)   -- a "Vm...:" line of /proc/pid/status
  return tonumber(read_file("/proc/" .. pid .. "/status"):match("\n" .. field .. ":%s*(%d+)"))
end

-- Peak RSS, kB. The kernel raises VmHWM only when RSS is about to shrink, so it can lag the
-- current VmRSS: the peak is the larger.
local function peak_kb(pid)
  return math.max(proc_kb(pid, "VmHWM"), proc_kb(pid, "VmRSS"))
end

-- ---- calls ----

local client <close> = assert(rpc.client(queue, {url = os.getenv("RPC_URL"), reply_to = mode,
                                                 timeout = TIMEOUT}))
if inflight > 1 and not client.send then
  io.stdout:write('{"skipped":"client:send is missing from this build"}\n')
  os.exit(0)
end

local function check(reply, message, kind)
  if reply ~= BODY then
    io.stderr:write("lua_client: ", tostring(message or "reply differs from the request"),
                    " (", tostring(kind), ")\n")
    os.exit(1)
  end
end

local ids, sent = {}, {}   -- the ring: what is in flight in each slot, and since when
local function send(slot)
  sent[slot] = monotime()
  ids[slot] = client:send(BODY)
end

local lat = {}
local t0 = monotime()
local start, stop, measuring, measured, total = 0, 0, false, 0, 0
local cpu0, server_cpu0, broker_cpu0, rss_warm, lua_kb_warm
if inflight > 1 then
  for slot = 1, inflight do send(slot) end
end
local slot = 1
while true do
  local t
  if inflight == 1 then
    local before = monotime()
    check(client:call(BODY, TIMEOUT))
    t = monotime()
    if measuring then lat[#lat + 1] = t - before end
  else
    check(client:wait(ids[slot]))
    t = monotime()
  end
  total = total + 1
  if measuring then
    measured = measured + 1
    if done(t - start, measured) then
      stop = t
      break
    end
  elseif warmed(t - t0, total) then   -- warm-up over: the measured phase starts now
    measuring, start = true, t
    cpu0, server_cpu0 = proc_cpu("self"), proc_cpu(server_pid)
    broker_cpu0 = broker_pid and proc_cpu(broker_pid)
    rss_warm, lua_kb_warm = proc_kb("self", "VmRSS"), collectgarbage("count")
  end
  if inflight > 1 then
    send(slot)
    slot = slot % inflight + 1
  end
end
local cpu, server_cpu = proc_cpu("self") - cpu0, proc_cpu(server_pid) - server_cpu0
local broker_cpu = broker_pid and ("%.3f"):format(proc_cpu(broker_pid) - broker_cpu0) or "null"
local rss_end, lua_kb_end = proc_kb("self", "VmRSS"), collectgarbage("count")
if inflight > 1 then   -- drain what is in flight (the slot that ended the loop is done)
  for i = 1, inflight - 1 do check(client:wait(ids[(slot + i - 1) % inflight + 1])) end
end
local stats = client:stats()
client:close()

table.sort(lat)
local function percentile(p)   -- nearest rank, as the C and Python clients
  return #lat > 0 and lat[math.max(1, math.ceil(p * #lat))] or 0
end
io.stdout:write(('{"calls":%d,"seconds":%.6f,"rate":%.1f,"p50_us":%.1f,"p99_us":%.1f,' ..
                 '"client_cpu":%.3f,"server_cpu":%.3f,"broker_cpu":%s,' ..
                 '"client_rss_kb":%d,"server_rss_kb":%d,' ..
                 '"rss_warm_kb":%d,"rss_end_kb":%d,"discarded":%d,"warmup_calls":%d,' ..
                 '"lua_kb_warm":%.0f,"lua_kb_end":%.0f}\n'):format(
  measured, stop - start, measured / (stop - start), percentile(0.50) * 1e6,
  percentile(0.99) * 1e6, cpu, server_cpu, broker_cpu, peak_kb("self"), peak_kb(server_pid),
  rss_warm, rss_end, stats.discarded, total - measured,
  lua_kb_warm, lua_kb_end))
