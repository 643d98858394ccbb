-- Interop with the RabbitMQ tutorial 6 programs (pika, spec/support/rpc_*.py) and the
-- examples: their client against our server, our client against theirs.
local H = require "support.helpers"

local function lines_of(s)
  local set = {}
  for line in s:gmatch("[^\n]+") do set[line] = true end
  return set
end

--- Starts examples/fib_server.lua on queue and waits until it is consuming.
local function fib_server(T, queue)
  local server = T:spawn {script = "examples/fib_server.lua", queue = queue}
  server:wait_output("%[x%] Awaiting RPC requests")
  return server
end

describe("interop #interop", function()
  teardown(H.cleanup)

  it("the tutorial's pika client gets fib(30) from examples/fib_server.lua", function()
    local T = H.scope(finally)
    local queue = H.queue("fib")
    local server = fib_server(T, queue)
    local out, status, err = H.run(H.PYTHON .. " " .. H.quote(H.ROOT .. "/spec/support/rpc_client.py") .. " 30",
                                   {RPC_QUEUE = queue})
    assert.equal(0, status, out .. err)
    local lines = lines_of(out)
    assert.is_true(lines[" [x] Requesting fib(30)"], out)
    assert.is_true(lines[" [.] Got 832040"], out)
    assert.matches("fib%(30%)", server:output())
  end)

  it("our client gets fib(n) from the tutorial's pika server", function()
    local T = H.scope(finally)
    local queue = H.queue("pika-fib")
    local server = T:spawn {python = H.ROOT .. "/spec/support/rpc_server.py", queue = queue}
    server:wait_output("%[x%] Awaiting RPC requests")
    for _, mode in ipairs {"direct", "exclusive"} do
      local client = T:client(queue, {reply_to = mode})
      assert.equal("55", client:call(10, 10))
      assert.equal("832040", client:call("30", 10))
    end
    assert.matches("%[%.%] fib%(30%)", server:output())
  end)

  it("examples/fib_client.lua 30 prints the tutorial's lines against examples/fib_server.lua", function()
    local T = H.scope(finally)
    local queue = H.queue("fib-lua")
    fib_server(T, queue)
    local out, status, err = H.run(H.LUA .. " " .. H.quote(H.ROOT .. "/examples/fib_client.lua") .. " 30",
                                   {RPC_QUEUE = queue})
    assert.equal(0, status, out .. err)
    local lines = lines_of(out)
    assert.is_true(lines[" [x] Requesting fib(30)"], out)
    assert.is_true(lines[" [.] Got 832040"], out)
  end)

  it("the tutorial's pika client and server talk to each other (the helpers work)", function()
    local T = H.scope(finally)
    local queue = H.queue("pika-pika")
    local server = T:spawn {python = H.ROOT .. "/spec/support/rpc_server.py", queue = queue}
    server:wait_output("%[x%] Awaiting RPC requests")
    local out, status, err = H.run(H.PYTHON .. " " .. H.quote(H.ROOT .. "/spec/support/rpc_client.py") .. " 20",
                                   {RPC_QUEUE = queue})
    assert.equal(0, status, out .. err)
    assert.is_true(lines_of(out)[" [.] Got 6765"], out)
  end)

  it("our server's remote error reaches a pika client as header x-rpc-error", function()
    local T = H.scope(finally)
    local queue = H.queue("fib-bad")
    fib_server(T, queue)
    -- as the tutorial's client does: a server-named exclusive reply queue, allowed by default
    local out, status, err = H.run(H.PYTHON .. " -c " .. H.quote([[
import json, os, sys, pika
conn = pika.BlockingConnection(pika.URLParameters(os.environ["RPC_URL"]))
ch = conn.channel()
replies = ch.queue_declare(queue="", exclusive=True).method.queue
ch.basic_publish(exchange="", routing_key=os.environ["RPC_QUEUE"], body=b"not a number",
                 properties=pika.BasicProperties(reply_to=replies, correlation_id="cid-bad"))
for method, props, body in ch.consume(replies, auto_ack=True, inactivity_timeout=10):
    break
if method is None: sys.exit("no reply")
print(json.dumps({"cid": props.correlation_id, "error": props.headers["x-rpc-error"],
                  "body": body.decode()}))
]]), {RPC_QUEUE = queue, RPC_URL = H.URL})
    assert.equal(0, status, out .. err)
    local reply = require("dkjson").decode(out)
    assert.equal("cid-bad", reply.cid)
    assert.is_true(#reply.error > 0)
    assert.equal(reply.error, reply.body)
    -- and the same error through our client
    local _, message, kind = T:client(queue):call("not a number", 10)
    assert.equal("remote", kind)
    assert.matches(reply.body, message, 1, true)
    -- the server keeps serving
    assert.equal("832040", T:client(queue):call(30, 10))
  end)
end)
