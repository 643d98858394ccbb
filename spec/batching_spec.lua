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

describe("queued replies", function()
  after_each(H.cleanup)

  it("go out while a handler of the same server waits in a loop nested in its step", function()
    local T = H.scope(finally)
    local queue = H.queue("nested")
    -- "hold" waits inside a gsub callback, where it cannot yield: the wait runs the loop there
    T:spawn {code = [[
      local rpc = require "rpc"
      local server = assert(rpc.server(os.getenv("SPEC_QUEUE"), function(body)
        if body == "hold" then ("x"):gsub("x", function() rpc.sleep(3) end) end
        if body == "quick" then rpc.sleep(0.1) end
        return body
      end, {url = os.getenv("RPC_URL"), prefetch = 10}))
      print("ready") io.stdout:flush()
      server:run()
    ]], queue = queue}:wait_output("ready")
    local client = T:client(queue)
    local quick = assert(client:send("quick", {timeout = 10}))
    H.sleep(0.02)
    local hold = assert(client:send("hold", {timeout = 10}))
    local elapsed, reply = H.timed(client.wait, client, quick)
    assert.equal("quick", reply)
    assert.is_true(elapsed < 1, ("the quick reply came after %.2f s, behind the held handler"):format(elapsed))
    assert.equal("hold", client:wait(hold))
  end)

  it("go out when run() returns with more requests buffered", function()
    local T = H.scope(finally)
    local queue = H.queue("stopped")
    local child = T:spawn {code = [[
      local rpc = require "rpc"
      local server
      server = assert(rpc.server(os.getenv("SPEC_QUEUE"), function(body)
        if body == "stop" then server:stop() end
        return body
      end, {url = os.getenv("RPC_URL"), prefetch = 50}))
      print("ready") io.stdout:flush()
      server:run()
      print("stopped") io.stdout:flush()
      os.execute("sleep 3")   -- not a rabbitrpc wait: nothing of ours runs here
      os.exit(0)              -- no close, no finalizers
    ]], queue = queue}
    child:wait_output("ready")
    local client = T:client(queue)
    local ids = {}
    for i = 1, 5 do ids[i] = assert(client:send("a" .. i, {timeout = 10})) end
    local stop = assert(client:send("stop", {timeout = 10}))
    for i = 6, 25 do ids[i] = assert(client:send("b" .. i, {timeout = 10})) end
    child:wait_output("stopped")
    for i = 1, 5 do
      local reply, message, kind = client:wait(ids[i], 2)
      assert.equal("a" .. i, reply, ("a%d: %s (%s)"):format(i, tostring(message), tostring(kind)))
    end
    assert.equal("stop", client:wait(stop, 2))
  end)
end)

describe("frames", function()
  after_each(H.cleanup)

  it("follow the frame_max the broker negotiated (8 KiB here), requests and replies alike", function()
    local T = H.scope(finally)
    local port = H.PORT + 21
    local dir = H.tmpdir() .. "/frame-node"
    os.execute("mkdir -p " .. H.quote(dir .. "/conf.d"))
    H.write_file(dir .. "/conf.d/90-frame.conf", "frame_max = 8192\n")
    local env = {RPC_BROKER_PORT = tostring(port), RPC_BROKER_DIR = dir}
    T:defer(function() H.run(H.quote(H.BROKER) .. " stop", env) end)
    local out, status, err = H.run(H.quote(H.BROKER) .. " start", env)
    assert.equal(0, status, out .. err)
    local url = H.url_with {port = port}
    local queue = H.queue("frames")
    local server = T:server(queue, function(body)
      if body == "raise" then error(("e"):rep(9000), 0) end
      if body == "headers" then return "h", {headers = {big = ("h"):rep(9000)}} end
      return body:reverse()
    end, {url = url})
    local client = T:client(queue, {url = url})
    for _, size in ipairs {8183, 8184, 20000, 300000} do
      local body = ("0123456789abcdef"):rep(size // 16 + 1):sub(1, size)
      local reply, message, kind = client:call(body, 10)
      assert.equal(body:reverse(), reply, ("%d bytes: %s (%s)"):format(size, tostring(message), tostring(kind)))
    end
    -- what goes in a reply's header frame must fit one too: an error's text is cut, headers
    -- too big for the frame are an error reply, and the server serves on without reconnecting
    local reply, message, kind = client:call("raise", 5)
    assert.is_nil(reply)
    assert.equal("remote", kind, message)
    assert.matches("^eeee", message)
    reply, message, kind = client:call("headers", 5)
    assert.is_nil(reply)
    assert.equal("too_large", kind, message)
    assert.matches("frame size", message, 1, true)
    assert.equal("ko", client:call("ok", 5))
    assert.equal(0, server:stats().reconnects)
  end)

  it("a large body with a short call timeout does not cost the shared connection", function()
    local T = H.scope(finally)
    local queue = H.queue("bigbody")
    local client = T:client(queue, {max_body = 64 * 1024 * 1024})
    T:server(queue, function(body)
      if #body > 5 then rpc.sleep(0.5) end  -- the call's timeout comes first, however fast the write
      return #body
    end, {max_body = 64 * 1024 * 1024, prefetch = 2})
    local other = assert(client:send("other", {timeout = 20}))
    local reply, message, kind = client:call(("x"):rep(64 * 1024 * 1024 - 1024), 0.05)
    assert.is_nil(reply)
    assert.equal("timeout", kind, message)
    assert.equal("5", client:wait(other))   -- the connection lived on
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
    assert.is_true(counts.getpid < 10, ("%d getpid for 1,000 calls"):format(counts.getpid))  -- ASan makes one
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
