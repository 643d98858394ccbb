-- Batched acks, coalesced writes and correlation ids without syscalls (issue 13), against the
-- real broker. System calls are counted with strace (scripts/deps.sh installs it).
local H = require "support.helpers"
local rpc = require "rpc"

local UUID_V4 = "^%x%x%x%x%x%x%x%x%-%x%x%x%x%-4%x%x%x%-[89ab]%x%x%x%-%x%x%x%x%x%x%x%x%x%x%x%x$"

local function strace_path()
  local path = H.run("sh -c 'command -v strace'"):match("[^\n]+")
  return assert(path, "strace is not installed (scripts/deps.sh should install it)")
end

--- Counts, per system call name, the calls strace -f logged in file path.
local function count_calls(path)
  local counts = setmetatable({}, {__index = function() return 0 end})
  for name in (H.read_file(path) or ""):gmatch("%f[%w_]([%w_]+)%(") do counts[name] = counts[name] + 1 end
  return counts
end

--- Messages and consumers of queue, from a passive declare.
local function queue_state(queue)
  local conn = assert(rpc.connect(H.opts()))
  local _, messages, consumers = conn:declare_queue(queue, {passive = true})
  conn:close()
  return messages, consumers
end

describe("batched acks", function()
  after_each(H.cleanup)

  it("a server answers 2,000 pipelined calls in far fewer writes than requests and leaves nothing unacked", function()
    local T = H.scope(finally)
    local queue = H.queue("batch")
    local dir = H.tmpdir()
    local trace = dir .. "/server.strace"
    local server = T:spawn {
      sh = ("%s -f -e trace=sendto,sendmsg,write -o %s %s %s/spec/support/batch_server.lua")
        :format(H.quote(strace_path()), H.quote(trace), H.LUA, H.quote(H.ROOT)),
      queue = queue, env = {LUA_PATH = H.LUA_PATH, LUA_CPATH = H.ROOT .. "/" .. H.LUA_CPATH, SPEC_COUNT = "2000"},
    }
    server:wait_output("ready")
    local client = T:client(queue)
    local ids = {}
    for i = 1, 2000 do ids[i] = assert(client:send("n" .. i, {timeout = 20})) end
    for i = 1, 2000 do
      local reply, message, kind = client:wait(ids[i])
      assert.equal("n" .. i, reply, ("call %d: %s (%s)"):format(i, tostring(message), tostring(kind)))
    end
    H.wait_until(function() return server:status() end, 10, "the server to end")
    assert.equal(0, server:status(), server:output())
    local counts = count_calls(trace)
    local writes = counts.sendto + counts.sendmsg + counts.write
    -- naive: 4 per request (3 frames of the reply, 1 ack); one write per loop pass here
    assert.is_true(writes < 1000, ("%d writes for 2,000 requests"):format(writes))
    local messages, consumers = queue_state(queue)
    assert.equal(0, consumers)
    assert.equal(0, messages, "requests went back to the queue: some were never acked")
  end)

  it("a slow request does not hold the prefetch window shut: the quick ones behind it are acked", function()
    local T = H.scope(finally)
    local queue = H.queue("slow")
    local server = T:server(queue, function(body)
      if body == "slow" then rpc.sleep(3) end
      return body
    end, {prefetch = 4})
    local client = T:client(queue)
    local slow = assert(client:send("slow", {timeout = 10}))
    local ids = {}
    for i = 1, 40 do ids[i] = assert(client:send("q" .. i, {timeout = 10})) end
    local t0 = H.now()
    for i = 1, 40 do assert.equal("q" .. i, client:wait(ids[i])) end
    local quick = H.now() - t0
    -- with one ack for all, only after the slow one, 3 would pass per 3 s
    assert.is_true(quick < 2, ("the 40 quick calls took %.2f s behind the slow one"):format(quick))
    assert.equal("slow", client:wait(slow))
    assert.equal(41, server:stats().replies)
    server:close()
    assert.equal(0, (queue_state(queue)), "requests went back to the queue: some were never acked")
  end)

  it("a server killed with its acks unsent has its requests redelivered: every call is answered", function()
    local T = H.scope(finally)
    local queue = H.queue("killed")
    local code = [[
      local rpc = require "rpc"
      local server = assert(rpc.server(os.getenv("SPEC_QUEUE"), function(body)
        rpc.sleep(0.002)
        return "re:" .. body
      end, {url = os.getenv("RPC_URL"), prefetch = 50}))
      print("ready") io.stdout:flush()
      server:run()
    ]]
    local first = T:spawn {code = code, queue = queue}
    first:wait_output("ready")
    local client = T:client(queue)
    local ids = {}
    for i = 1, 600 do ids[i] = assert(client:send(tostring(i), {timeout = 20})) end
    for i = 1, 100 do assert.equal("re:" .. i, client:wait(ids[i])) end
    first:kill("KILL")
    local second = T:spawn {code = code, queue = queue}
    second:wait_output("ready")
    for i = 101, 600 do
      local reply, message, kind = client:wait(ids[i])
      assert.equal("re:" .. i, reply, ("call %d: %s (%s)"):format(i, tostring(message), tostring(kind)))
    end
  end)
end)

describe("writes and ids", function()
  after_each(H.cleanup)

  it("a call is one write, with no socket option changed and no system call for its id", function()
    local T = H.scope(finally)
    local queue = H.queue("calls")
    local server = T:spawn {code = [[
      local rpc = require "rpc"
      print("ready") io.stdout:flush()
      rpc.serve(os.getenv("SPEC_QUEUE"), function(body) return body end, {url = os.getenv("RPC_URL")})
    ]], queue = queue}
    server:wait_output("ready")
    H.sleep(0.3)  -- its consumer is up
    local dir = H.tmpdir()
    local trace, script = dir .. "/client.strace", dir .. "/client.lua"
    H.write_file(script, [[
      local rpc = require "rpc"
      local client = assert(rpc.client(os.getenv("SPEC_QUEUE"), {url = os.getenv("RPC_URL")}))
      for i = 1, 1000 do assert(client:call("c" .. i, 5) == "c" .. i) end
      client:close()
    ]])
    local out, status, err = H.run(("%s -f -e trace=sendto,sendmsg,write,setsockopt,getrandom,getpid -o %s %s %s")
      :format(H.quote(strace_path()), H.quote(trace), H.LUA, H.quote(script)), {SPEC_QUEUE = queue})
    assert.equal(0, status, out .. err)
    local counts = count_calls(trace)
    local writes = counts.sendto + counts.sendmsg + counts.write
    assert.is_true(writes >= 1000 and writes < 1030, ("%d writes for 1,000 calls"):format(writes))
    assert.is_true(counts.setsockopt < 10, ("%d setsockopt for 1,000 calls"):format(counts.setsockopt))
    assert.is_true(counts.getrandom < 10, ("%d getrandom for 1,000 calls"):format(counts.getrandom))
    assert.equal(0, counts.getpid)
  end)

  it("correlation ids are distinct random uuids (version 4, RFC 4122 variant)", function()
    local T = H.scope(finally)
    local queue = H.queue("ids")
    T:server(queue, function(_, request) return request.correlation_id end, {prefetch = 100})
    local client = T:client(queue)
    local seen, ids = {}, {}
    for round = 1, 10 do
      for i = 1, 500 do ids[i] = assert(client:send("x")) end
      for i = 1, 500 do
        local id = assert(client:wait(ids[i]))
        assert.equal(ids[i], id)
        assert.matches(UUID_V4, id)
        assert.is_nil(seen[id], "an id came twice: " .. id)
        seen[id] = round
      end
    end
  end)
end)
