-- Poison requests (opts.max_deliveries): a request that kills every server that runs it is
-- rejected after max_deliveries deliveries, with a 'poisoned' error reply, instead of killing
-- servers forever. Real crashes: child servers call os.exit(1) in the handler, and the spec
-- keeps them in a restart loop, as a process supervisor would.
local H = require "support.helpers"
local rpc = require "rpc"

-- A child server (prefetch 1; more options from SPEC_OPTS, a Lua table's fields). On body
-- "boom" its handler appends a line to SPEC_LOG (request.redelivered and the two count headers),
-- then exits with status 1, unless that line is past the first SPEC_CRASHES (unset: always):
-- then it answers "survived N", N being the run. Any other body is answered "ok:" .. body.
local CRASHING_SERVER = [[
local LOG, CRASHES = os.getenv("SPEC_LOG"), tonumber(os.getenv("SPEC_CRASHES") or "")
local opts = assert(load("return {" .. (os.getenv("SPEC_OPTS") or "") .. "}"))()
opts.url, opts.prefetch = URL, 1
opts.log = function(line) io.stderr:write(line, "\n") end
local function runs()
  local n, f = 0, io.open(LOG)
  if f then for _ in f:lines() do n = n + 1 end f:close() end
  return n
end
local server = assert(rpc.server(QUEUE, function(body, request)
  if body ~= "boom" then return "ok:" .. body end
  local h = request.headers or {}
  local f = assert(io.open(LOG, "a"))
  f:write(("%s %s %s\n"):format(tostring(request.redelivered), tostring(h["x-rpc-deliveries"]),
                                tostring(h["x-delivery-count"])))
  f:close()
  local run = runs()
  if not CRASHES or run <= CRASHES then os.exit(1) end
  return "survived " .. run
end, opts))
ready()
server:run()
]]

-- A child that calls "boom" and prints what the call returned.
local CALLER = [[
local client = assert(rpc.client(QUEUE, {url = URL}))
local reply, message, kind = client:call("boom", 60)
print(("result: %s|%s|%s"):format(tostring(reply), tostring(message), tostring(kind)))
]]

local QUORUM = 'durable = true, arguments = {["x-queue-type"] = "quorum"}'

--- The lines SPEC_LOG has: one per run of the "boom" handler.
local function runs_of(log)
  local lines = {}
  for line in (H.read_file(log) or ""):gmatch("[^\n]+") do lines[#lines + 1] = line end
  return lines
end

--- Keeps n crashing servers (CRASHING_SERVER with env) running until done() is true: each one
-- that exits (status 1: its handler's os.exit) is replaced by a new one. each(), if given, runs
-- on every turn. Returns every server it started.
local function supervise(T, queue, n, env, done, each, timeout)
  local servers, all = {}, {}
  local function start()
    all[#all + 1] = T:spawn {code = CRASHING_SERVER, queue = queue, env = env}
    return all[#all]
  end
  for i = 1, n do servers[i] = start() end
  for i = 1, n do servers[i]:wait_ready() end
  H.wait_until(function()
    if each then each() end
    if done() then return true end
    for i, server in ipairs(servers) do
      local status = server:status()
      if status then
        assert(status == 1, ("a server exited with %d, not by its handler: %s"):format(status, server:output()))
        servers[i] = start()
      end
    end
  end, timeout or 60, "the supervised servers' work")
  return all
end

--- Messages in queue (a passive declare).
local function messages_in(queue)
  local r = H.amqp1 {op = "count", queue = queue}
  assert(r.ok, "cannot count " .. queue .. ": " .. tostring(r.text))
  return r.messages
end

--- The poison run of spec (1) on a classic queue and (2) on a quorum queue: a caller's "boom"
-- crashes two restarted servers until it is poisoned; 20 calls during and 20 after are answered.
local function poison_run(finally, what, opts, count_lines)
  local T = H.scope(finally)
  local queue = H.queue(what)
  local log = H.tmpdir() .. "/" .. queue .. ".runs"
  local env = {SPEC_LOG = log, SPEC_OPTS = opts}
  local client = T:client(queue)
  local caller, ids, t0 = nil, {}, nil
  local servers = supervise(T, queue, 2, env, function()
    return caller and caller:status()
  end, function()
    if not caller then
      t0 = H.now()
      caller = T:spawn {code = CALLER, queue = queue}
    elseif #ids == 0 and #runs_of(log) > 0 then
      -- calls once the servers crash: this turn comes before the restart the third run needs
      for i = 1, 20 do ids[i] = assert(client:send("during " .. i, {timeout = 60})) end
    end
  end)
  local elapsed = H.now() - t0
  assert.equal(20, #ids, "no call was made while the servers crashed")
  assert.equal(0, caller:status(), caller:output())
  local reply, message, kind = caller:output():match("result: ([^|\n]*)|([^|\n]*)|([^|\n]*)")
  assert.equal("nil", reply, caller:output())
  assert.equal("poisoned", kind, message)
  assert.matches("request delivered 4 times, more than max_deliveries %(3%)", message)
  assert.matches("rejected unhandled by queue '" .. queue .. "'", message, 1, true)
  -- the handler ran 3 times, each a delivery the count saw: the 4th was rejected unrun
  assert.same(count_lines, runs_of(log))
  for i = 1, 20 do
    local r, m, k = client:wait(ids[i])
    assert.equal("ok:during " .. i, r, ("call %d: %s (%s)"):format(i, tostring(m), tostring(k)))
  end
  for i = 1, 20 do assert.equal("ok:after " .. i, client:call("after " .. i, 10)) end
  -- three servers died, one per run; the others are still serving
  local logs, died = {}, 0
  for _, server in ipairs(servers) do
    local status = server:status()
    if status then
      assert.equal(1, status, server:output())
      died = died + 1
    end
    logs[#logs + 1] = server:output()
  end
  assert.equal(#count_lines, died)
  assert.matches("rejected a request delivered 4 times %(max_deliveries 3%): poisoned", table.concat(logs))
  assert.equal(0, messages_in(queue), "the poisoned request went back to the queue")
  return elapsed
end

describe("poison requests", function()
  teardown(H.cleanup)

  it("a request that kills its server is rejected as 'poisoned' after 3 deliveries, and the others are answered (classic queue)", function()
    -- runs 2 and 3 are copies the redeliveries made, counting in x-rpc-deliveries
    local elapsed = poison_run(finally, "poison", "", {"false nil nil", "true 2 nil", "true 3 nil"})
    assert.is_true(elapsed < 30, ("the poisoning took %.1f s"):format(elapsed))
  end)

  it("a request that kills its server is rejected as 'poisoned' on a quorum queue, by the broker's x-delivery-count", function()
    -- no copies: RabbitMQ counts earlier deliveries in x-delivery-count, from the first redelivery
    local elapsed = poison_run(finally, "poison-quorum", QUORUM, {"false nil nil", "true nil 1", "true nil 2"})
    assert.is_true(elapsed < 30, ("the poisoning took %.1f s"):format(elapsed))
  end)

  it("a redelivered request that is not poison (one crash) is answered normally", function()
    local T = H.scope(finally)  -- one for both cases: busted keeps a test's last finally only
    for _, case in ipairs {{"classic", "", "true 2 nil"}, {"quorum", QUORUM, "true nil 1"}} do
      local queue = H.queue("once-" .. case[1])
      local log = H.tmpdir() .. "/" .. queue .. ".runs"
      local env = {SPEC_LOG = log, SPEC_OPTS = case[2], SPEC_CRASHES = "1"}
      local client = T:client(queue)
      local id
      supervise(T, queue, 2, env, function() return #runs_of(log) == 2 end, function()
        id = id or assert(client:send("boom", {timeout = 30}))
      end)
      assert.equal("survived 2", client:wait(id, 10))
      assert.same({"false nil nil", case[3]}, runs_of(log), case[1])
    end
  end)

  it("copies a redelivery without the user_id of another user, which the broker would refuse from the server", function()
    local T = H.scope(finally)
    local user, password = "spec-poison-" .. H.hex(3), H.hex(8)
    T:defer(function() H.ctl("delete_user", user) end)
    local out, status = H.ctl("add_user", user, password)
    assert.equal(0, status, out)
    out, status = H.ctl("set_permissions", "-p", "/", user, ".*", ".*", ".*")
    assert.equal(0, status, out)
    local conn = assert(rpc.connect(H.opts {url = H.url_with {user = user, password = password}}))
    T:defer(function() conn:close() end)
    local replies = assert(conn:declare_queue("", {exclusive = true}))
    assert(conn:consume(replies, {ack = false}))
    local queue = H.queue("poison-user")
    local log = H.tmpdir() .. "/" .. queue .. ".runs"
    local sent
    -- the servers log in as the spec's user; a copy with the publisher's user_id would make the
    -- broker close their channel (406) on every redelivery: the second run would never come
    supervise(T, queue, 2, {SPEC_LOG = log, SPEC_CRASHES = "1"}, function() return #runs_of(log) == 2 end, function()
      sent = sent or assert(conn:publish("", queue, "boom", {user_id = user, reply_to = replies,
                                                               correlation_id = "poison-user"}))
    end, 20)
    local reply = assert(conn:receive(10))
    assert.equal("survived 2", reply.body)
    assert.equal("poison-user", reply.correlation_id)
    assert.same({"false nil nil", "true 2 nil"}, runs_of(log))
  end)

  it("with max_deliveries = 0 never poisons: the redelivered request is handled again and again", function()
    local T = H.scope(finally)
    local queue = H.queue("poison-off")
    local log = H.tmpdir() .. "/" .. queue .. ".runs"
    -- crashes 4 times, more than the default max_deliveries would let it
    local env = {SPEC_LOG = log, SPEC_OPTS = "max_deliveries = 0", SPEC_CRASHES = "4"}
    local client = T:client(queue)
    local id
    supervise(T, queue, 2, env, function() return #runs_of(log) == 5 end, function()
      id = id or assert(client:send("boom", {timeout = 60}))
    end)
    local reply, message, kind = client:wait(id, 10)
    assert.equal("survived 5", reply, tostring(message) .. " (" .. tostring(kind) .. ")")
    -- the broker's own redeliveries: nothing copied, nothing counted
    assert.same({"false nil nil", "true nil nil", "true nil nil", "true nil nil", "true nil nil"}, runs_of(log))
  end)

  it("counts poisoned requests in stats().poisoned and dead-letters them through the queue's x-dead-letter-exchange", function()
    local T = H.scope(finally)
    local queue, dead = H.queue("poison-dlx"), H.queue("poison-dead")
    local dlx = "spec-poison-dlx-" .. H.hex(4)
    local conn = assert(rpc.connect(H.opts()))
    T:defer(function()
      conn:delete_exchange(dlx)
      conn:close()
    end)
    assert(conn:declare_exchange(dlx, "fanout"))
    assert(conn:declare_queue(dead))
    assert(conn:bind(dead, dlx))
    local log = H.tmpdir() .. "/" .. queue .. ".runs"
    local env = {SPEC_LOG = log, SPEC_OPTS = ('arguments = {["x-dead-letter-exchange"] = %q}'):format(dlx)}
    local client = T:client(queue)
    local id
    -- one server, not replaced after the third crash: the fourth delivery comes to ours
    supervise(T, queue, 1, env, function() return #runs_of(log) == 3 end, function()
      id = id or assert(client:send("boom", {timeout = 60}))
    end)
    local ran, lines = 0, {}
    local server = T:server(queue, function()
      ran = ran + 1
      error("the handler ran")
    end, {arguments = {["x-dead-letter-exchange"] = dlx}, log = function(line) lines[#lines + 1] = line end})
    local reply, message, kind = client:wait(id, 10)
    assert.is_nil(reply)
    assert.equal("poisoned", kind, message)
    assert.matches("more than max_deliveries (3)", message, 1, true)
    assert.equal(0, ran)
    local stats = server:stats()
    assert.equal(1, stats.poisoned)
    assert.equal(1, stats.requests)
    assert.equal(1, stats.replies)
    assert.equal(0, stats.errors)
    assert.matches("rejected a request delivered 4 times (max_deliveries 3): poisoned", table.concat(lines, "\n"), 1, true)
    assert(conn:consume(dead))
    local msg = assert(conn:receive(5))
    assert.equal("boom", msg.body)
    assert.equal(3, msg.headers["x-rpc-deliveries"])
    local death = msg.headers["x-death"] and msg.headers["x-death"][1]
    assert.is_table(death, "no x-death header: not dead-lettered")
    assert.equal("rejected", death.reason)
    assert.equal(queue, death.queue)
    assert(conn:ack(msg.delivery_tag))
    assert.equal(0, messages_in(queue), "the poisoned request went back to the queue")
  end)

  it("raises 'bad argument' for a max_deliveries that is negative or not an integer", function()
    local handler = function(body) return body end
    for _, bad in ipairs {-1, 2.5, "3", true, math.huge} do
      local err = H.error_of(function()
        local s = rpc.server("spec-poison-args", handler, H.opts {max_deliveries = bad})
        return s
      end)
      assert.matches("bad argument #3 to 'server' %(option 'max_deliveries' must be", err)
    end
    local T = H.scope(finally)
    for _, good in ipairs {0, 1, 3.0, 100} do
      T:server(H.queue("poison-args"), handler, {max_deliveries = good, auto_delete = true})
    end
  end)
end)
