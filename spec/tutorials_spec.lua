-- The RabbitMQ tutorials 1 to 5 as examples/*.lua (over rpc.connect), against the real broker
-- and crossed with the tutorials' own pika programs (spec/support/tutorials/*.py). Each test
-- has its own queue or exchange (env RPC_QUEUE / RPC_EXCHANGE); receivers are children.
local H = require "support.helpers"

local TUTORIALS = H.ROOT .. "/spec/support/tutorials/"

--- The lines of s, as a list.
local function lines_of(s)
  local list = {}
  for line in s:gmatch("[^\n]+") do list[#list + 1] = line end
  return list
end

--- The " [x] ..." lines of a receiver's output: what it received.
local function received(child)
  local list = {}
  for _, line in ipairs(lines_of(child:output())) do
    if line:find("^ %[x%] ") then list[#list + 1] = line end
  end
  return list
end

--- s as a Lua pattern matching itself, on a line of its own.
local function line_pattern(s)
  return "%f[^\n\0]" .. s:gsub("%p", "%%%0") .. "\n"
end

--- Runs examples/<name>.lua (lang "lua") or spec/support/tutorials/<name>.py (lang "py") to
-- completion with args and env; asserts it succeeded and returns its output lines.
local function run(lang, name, args, env)
  local cmd = lang == "lua" and H.LUA .. " " .. H.quote(H.ROOT .. "/examples/" .. name .. ".lua")
           or H.PYTHON .. " " .. H.quote(TUTORIALS .. name .. ".py")
  for _, a in ipairs(args or {}) do cmd = cmd .. " " .. H.quote(a) end
  local out, status, err = H.run(cmd, env)
  assert.equal(0, status, ("%s.%s failed: %s%s"):format(name, lang, out, err))
  return lines_of(out)
end

--- Starts a receiver or worker (lang "lua" or "py") as a child of T and waits for its
-- " [*] Waiting for ..." line.
local function start(T, lang, name, args, env)
  local spec = {args = args, env = env}
  if lang == "lua" then spec.script = "examples/" .. name .. ".lua"
  else spec.python = TUTORIALS .. name .. ".py" end
  local child = T:spawn(spec)
  child:wait_output("%[%*%] Waiting for")
  return child
end

--- A fresh exchange name, deleted when the test ends (after its children have stopped).
local function exchange(T, what)
  local name = "spec-" .. what .. "-" .. H.hex(6)
  T:defer(function() H.amqp1 {op = "delete_exchange", exchange = name} end)
  return name
end

describe("tutorials #tutorials", function()
  teardown(H.cleanup)

  describe("1 hello world", function()
    it("examples/receive.lua prints what examples/send.lua sent to the queue", function()
      local T = H.scope(finally)
      local env = {RPC_QUEUE = H.queue("hello")}
      local receiver = start(T, "lua", "receive", nil, env)
      assert.same({" [x] Sent 'Hello World!'"}, run("lua", "send", nil, env))
      receiver:wait_output(line_pattern(" [x] Received Hello World!"))
      assert.same({" [x] Received Hello World!"}, received(receiver))
    end)

    it("the tutorial's receive.py gets what examples/send.lua sent", function()
      local T = H.scope(finally)
      local env = {RPC_QUEUE = H.queue("hello-py")}
      local receiver = start(T, "py", "receive", nil, env)
      run("lua", "send", nil, env)
      receiver:wait_output(line_pattern(" [x] Received Hello World!"))
    end)

    it("examples/receive.lua gets what the tutorial's send.py sent, sent before it started", function()
      local T = H.scope(finally)
      local env = {RPC_QUEUE = H.queue("hello-py")}
      assert.same({" [x] Sent 'Hello World!'"}, run("py", "send", nil, env))
      local receiver = start(T, "lua", "receive", nil, env)   -- the message waits in the queue
      receiver:wait_output(line_pattern(" [x] Received Hello World!"))
    end)
  end)

  describe("2 work queues", function()
    it("two examples/worker.lua share the tasks, each holding one unacknowledged task at a time", function()
      local T = H.scope(finally)
      local env = {RPC_QUEUE = H.queue("tasks")}
      local workers = {start(T, "lua", "worker", nil, env), start(T, "lua", "worker", nil, env)}
      assert.same({" [x] Sent slow.."}, run("lua", "new_task", {"slow.."}, env))
      for i = 1, 3 do run("lua", "new_task", {"fast " .. i}, env) end
      -- prefetch 1: the worker busy with the slow task gets nothing more until it acks it, so
      -- the other one does every fast task (plain round robin would queue one behind the slow)
      local function done(w) return select(2, w:output():gsub(" %[x%] Done\n", "")) end
      H.wait_until(function() return done(workers[1]) + done(workers[2]) == 4 end, 10, "4 tasks done")
      local slow, fast = workers[1], workers[2]
      if not H.contains(received(slow), " [x] Received slow..") then slow, fast = fast, slow end
      assert.same({" [x] Received slow..", " [x] Done"}, received(slow))
      assert.same({" [x] Received fast 1", " [x] Done", " [x] Received fast 2", " [x] Done",
                   " [x] Received fast 3", " [x] Done"}, received(fast))
      -- every task was acked: once the workers are gone, none comes back to the queue
      slow:stop()
      fast:stop()
      assert.equal(0, H.amqp1({op = "count", queue = env.RPC_QUEUE}).messages)
    end)

    it("a task whose worker is killed mid-task is redelivered to the other worker", function()
      local T = H.scope(finally)
      local env = {RPC_QUEUE = H.queue("tasks-kill")}
      local first = start(T, "lua", "worker", nil, env)
      run("lua", "new_task", {"long..."}, env)
      first:wait_output(line_pattern(" [x] Received long..."))
      local second = start(T, "lua", "worker", nil, env)
      first:kill("KILL")
      assert.is_not_nil(first:wait(5))
      assert.not_matches("Done", first:output())
      second:wait_output(line_pattern(" [x] Received long..."), 10)
      second:wait_output(line_pattern(" [x] Done"), 10)
    end)

    it("the tutorial's new_task.py and worker.py work with examples/worker.lua and new_task.lua", function()
      local T = H.scope(finally)
      local env = {RPC_QUEUE = H.queue("tasks-py")}
      run("lua", "new_task", nil, env)   -- a persistent message, as new_task.py sends
      local task = H.amqp1 {op = "get", queue = env.RPC_QUEUE}
      assert.equal("Hello World!", task.body)
      assert.equal(2, task.properties.delivery_mode)
      local worker = start(T, "lua", "worker", nil, env)
      assert.same({" [x] Sent from pika."}, run("py", "new_task", {"from", "pika."}, env))
      worker:wait_output(line_pattern(" [x] Done"))
      assert.same({" [x] Received from pika.", " [x] Done"}, received(worker))
      worker:stop()
      worker = start(T, "py", "worker", nil, env)
      run("lua", "new_task", {"from lua"}, env)
      worker:wait_output(line_pattern(" [x] Done"))
      assert.same({" [x] Received from lua", " [x] Done"}, received(worker))
    end)
  end)

  describe("3 publish/subscribe", function()
    it("every examples/receive_logs.lua gets each line examples/emit_log.lua sends", function()
      local T = H.scope(finally)
      local env = {RPC_EXCHANGE = exchange(T, "logs")}
      local receivers = {start(T, "lua", "receive_logs", nil, env), start(T, "lua", "receive_logs", nil, env)}
      assert.same({" [x] Sent info: Hello World!"}, run("lua", "emit_log", nil, env))
      run("lua", "emit_log", {"warning:", "disk", "full"}, env)
      for _, receiver in ipairs(receivers) do
        receiver:wait_output(line_pattern(" [x] warning: disk full"))
        assert.same({" [x] info: Hello World!", " [x] warning: disk full"}, received(receiver))
      end
    end)

    it("the tutorial's emit_log.py and receive_logs.py work with the Lua ones", function()
      local T = H.scope(finally)
      local env = {RPC_EXCHANGE = exchange(T, "logs-py")}
      local receivers = {start(T, "lua", "receive_logs", nil, env), start(T, "py", "receive_logs", nil, env)}
      run("lua", "emit_log", {"from lua"}, env)
      assert.same({" [x] Sent from pika"}, run("py", "emit_log", {"from pika"}, env))
      for _, receiver in ipairs(receivers) do
        receiver:wait_output(line_pattern(" [x] from pika"))
        assert.same({" [x] from lua", " [x] from pika"}, received(receiver))
      end
    end)
  end)

  describe("4 routing", function()
    it("examples/receive_logs_direct.lua error gets only the errors", function()
      local T = H.scope(finally)
      local env = {RPC_EXCHANGE = exchange(T, "direct")}
      local errors = start(T, "lua", "receive_logs_direct", {"error"}, env)
      local all = start(T, "lua", "receive_logs_direct", {"info", "warning", "error"}, env)
      assert.same({" [x] Sent info:Hello World!"}, run("lua", "emit_log_direct", nil, env))
      run("lua", "emit_log_direct", {"warning", "Low", "disk"}, env)
      run("lua", "emit_log_direct", {"debug", "nobody listens"}, env)
      run("lua", "emit_log_direct", {"error", "Run.", "Run."}, env)
      all:wait_output(line_pattern(" [x] error:Run. Run."))
      assert.same({" [x] info:Hello World!", " [x] warning:Low disk", " [x] error:Run. Run."}, received(all))
      errors:wait_output(line_pattern(" [x] error:Run. Run."))
      assert.same({" [x] error:Run. Run."}, received(errors))
    end)

    it("the tutorial's emit_log_direct.py reaches examples/receive_logs_direct.lua", function()
      local T = H.scope(finally)
      local env = {RPC_EXCHANGE = exchange(T, "direct-py")}
      local receiver = start(T, "lua", "receive_logs_direct", {"warning", "error"}, env)
      run("py", "emit_log_direct", {"info", "not this one"}, env)
      assert.same({" [x] Sent error:from pika"}, run("py", "emit_log_direct", {"error", "from", "pika"}, env))
      receiver:wait_output(line_pattern(" [x] error:from pika"))
      assert.same({" [x] error:from pika"}, received(receiver))
    end)

    it("examples/receive_logs_direct.lua without severities prints its usage and fails", function()
      local out, status, err = H.run(H.LUA .. " " .. H.quote(H.ROOT .. "/examples/receive_logs_direct.lua"))
      assert.equal(1, status)
      assert.equal("", out)
      assert.matches("^Usage: %S*receive_logs_direct%.lua %[info%] %[warning%] %[error%]\n$", err)
    end)
  end)

  describe("5 topics", function()
    it("binding keys '*.critical' and 'kern.#' select their messages, for Lua and pika receivers", function()
      local T = H.scope(finally)
      local env = {RPC_EXCHANGE = exchange(T, "topic")}
      local critical = start(T, "lua", "receive_logs_topic", {"*.critical"}, env)
      local kern = start(T, "lua", "receive_logs_topic", {"kern.#"}, env)
      local kern_py = start(T, "py", "receive_logs_topic", {"kern.#"}, env)
      assert.same({" [x] Sent anonymous.info:Hello World!"}, run("lua", "emit_log_topic", nil, env))
      for _, key in ipairs {"kern.info", "cron.critical", "cron.info", "kern", "kern.disk.full",
                            "critical", "kern.critical"} do  -- kern.critical, last, goes to all
        run("lua", "emit_log_topic", {key, "m"}, env)
      end
      for _, receiver in ipairs {critical, kern, kern_py} do
        receiver:wait_output(line_pattern(" [x] kern.critical:m"))
      end
      assert.same({" [x] cron.critical:m", " [x] kern.critical:m"}, received(critical))
      local kern_lines = {" [x] kern.info:m", " [x] kern:m", " [x] kern.disk.full:m", " [x] kern.critical:m"}
      assert.same(kern_lines, received(kern))
      assert.same(kern_lines, received(kern_py))
    end)

    it("the tutorial's emit_log_topic.py reaches examples/receive_logs_topic.lua", function()
      local T = H.scope(finally)
      local env = {RPC_EXCHANGE = exchange(T, "topic-py")}
      local receiver = start(T, "lua", "receive_logs_topic", {"*.orange.*", "lazy.#"}, env)
      run("py", "emit_log_topic", {"quick.brown.fox", "no"}, env)
      run("py", "emit_log_topic", {"quick.orange.rabbit", "yes"}, env)
      local sent = run("py", "emit_log_topic", {"lazy.brown.fox", "yes too"}, env)
      assert.same({" [x] Sent lazy.brown.fox:yes too"}, sent)
      receiver:wait_output(line_pattern(" [x] lazy.brown.fox:yes too"))
      assert.same({" [x] quick.orange.rabbit:yes", " [x] lazy.brown.fox:yes too"}, received(receiver))
    end)
  end)

  describe("failures", function()
    it("each script says '<script>: <message> (<kind>)' on standard error and exits 1", function()
      local closed = H.url_with {port = 1}                -- nothing listens there
      local wrong = H.url_with {password = "not-" .. H.PASSWORD}
      for _, case in ipairs {
        {"send", {}, closed, "connection"}, {"receive", {}, wrong, "auth"},
        {"new_task", {}, closed, "connection"}, {"worker", {}, closed, "connection"},
        {"emit_log", {}, closed, "connection"}, {"receive_logs", {}, closed, "connection"},
        {"emit_log_direct", {}, closed, "connection"},
        {"receive_logs_direct", {"error"}, closed, "connection"},
        {"emit_log_topic", {}, wrong, "auth"}, {"receive_logs_topic", {"#"}, closed, "connection"},
      } do
        local name, args, url, kind = table.unpack(case)
        local cmd = H.LUA .. " " .. H.quote(H.ROOT .. "/examples/" .. name .. ".lua")
        for _, a in ipairs(args) do cmd = cmd .. " " .. H.quote(a) end
        local out, status, err = H.run(cmd, {RPC_URL = url})
        assert.equal(1, status, name .. ": " .. out .. err)
        assert.equal("", out)
        assert.matches("^" .. name .. ": .+ %(" .. kind .. "%)\n$", err)
        H.assert_no_password(err, url)
      end
    end)

    it("a script refused by the broker names the broker's reason (a queue declared otherwise)", function()
      local env = {RPC_QUEUE = H.queue("durable")}
      run("lua", "new_task", {"x"}, env)              -- task queues are durable, hello ones not
      local out, status, err = H.run(H.LUA .. " " .. H.quote(H.ROOT .. "/examples/send.lua"), env)
      assert.equal(1, status, out .. err)
      assert.matches("^send: .*PRECONDITION_FAILED.* %(broker%)\n$", err)
    end)
  end)
end)
