-- Bodies and properties: opts.codec (JSON through lua-cjson, or a table of functions) on both
-- sides, the "codec" error kind, a handler's reply properties and a caller's properties = true.
-- Calls made as statements, never `return f(...)`: a tail call loses the name a bad argument has.
local H = require "support.helpers"
local rpc = require "rpc"

--- Asserts that fn raises "bad argument #n to 'name'", mentioning each extra plain text.
local function assert_bad(n, name, fn, ...)
  local err = H.error_of(fn)
  assert.matches("bad argument #" .. n .. " to '" .. name .. "'", err, 1, true)
  for _, text in ipairs {...} do assert.matches(text, err, 1, true) end
  return err
end

--- A reply's properties without x-rpc-handler-time, which every reply carries (checked here).
local function own(props)
  local headers = props.headers
  if type(headers) ~= "table" then return props end
  assert.is_number(headers["x-rpc-handler-time"], "the handler time header")
  local copy, t = {}, {}
  for k, v in pairs(headers) do if k ~= "x-rpc-handler-time" then t[k] = v end end
  for k, v in pairs(props) do copy[k] = v end
  copy.headers = next(t) and t or nil
  return copy
end

local function all_bytes()
  local t = {}
  for i = 0, 255 do t[#t + 1] = string.char(i) end
  return table.concat(t)
end

-- a codec of its own: "k=v;k=v" for flat tables of strings
local KV = {
  content_type = "text/x-kv",
  encode = function(t)
    local parts = {}
    for k, v in pairs(t) do parts[#parts + 1] = k .. "=" .. v end
    table.sort(parts)
    return table.concat(parts, ";")
  end,
  decode = function(s)
    local t = {}
    for k, v in s:gmatch("([^=;]+)=([^;]*)") do t[k] = v end
    if not next(t) then error("not k=v: " .. s, 0) end
    return t
  end,
}

describe("opts.codec", function()
  teardown(H.cleanup)

  it("round-trips nested tables as JSON with a Lua server, sent as application/json", function()
    local T = H.scope(finally)
    local queue = H.queue("json")
    local seen = {}
    T:server(queue, function(value, request)
      seen.value, seen.content_type = value, request.content_type
      return {echo = value, list = {1, 2, {deep = {deeper = {true, false, "x"}}}}, n = 0.5}
    end, {codec = "json"})
    local client = T:client(queue, {codec = "json"})
    local sent = {name = "lua", nested = {a = {b = {c = {1, 2, 3}}}}, flag = true, text = "hi"}
    local reply, message, kind = client:call(sent, 5)
    assert.is_nil(message)
    assert.is_nil(kind)
    assert.same(sent, seen.value)
    assert.equal("application/json", seen.content_type)
    assert.same({echo = sent, list = {1, 2, {deep = {deeper = {true, false, "x"}}}}, n = 0.5}, reply)
    -- strings and numbers are JSON values too
    assert.equal("plain", client:call("plain", 5).echo)
    assert.equal(42, client:call(42, 5).echo)
  end)

  it("carries unicode and any bytes inside strings byte-exact both ways", function()
    local T = H.scope(finally)
    local queue = H.queue("json-bytes")
    local received
    T:server(queue, function(value) received = value; return {back = value.s, u = value.u} end,
             {codec = "json"})
    local client = T:client(queue, {codec = "json"})
    local bytes = all_bytes() .. "\0end"
    local unicode = "héllo wörld ☃ 日本語 😀"
    local reply = assert(client:call({s = bytes, u = unicode}, 5))
    assert.is_true(received.s == bytes, "the server received different bytes")
    assert.equal(unicode, received.u)
    assert.is_true(reply.back == bytes, "the reply has different bytes")
    assert.equal(unicode, reply.u)
  end)

  it("uses a custom codec table's encode, decode and content_type on both sides", function()
    local T = H.scope(finally)
    local queue = H.queue("kv")
    local content_type
    T:server(queue, function(t, request)
      content_type = request.content_type
      return {sum = tostring(tonumber(t.a) + tonumber(t.b))}
    end, {codec = KV})
    local client = T:client(queue, {codec = KV})
    assert.same({sum = "5"}, client:call({a = "2", b = "3"}, 5))
    assert.equal("text/x-kv", content_type)
    -- callopts.content_type wins over the codec's
    client:call({a = "1", b = "1"}, 5, {content_type = "text/other"})
    assert.equal("text/other", content_type)
    -- later changes to the user's codec table do not count
    local codec = {encode = KV.encode, decode = KV.decode}
    local other = T:client(queue, {codec = codec})
    codec.decode = function() error("changed") end
    assert.same({sum = "7"}, other:call({a = "3", b = "4"}, 5))
  end)

  it("answers a body that is not JSON with 'codec', without running the handler, and serves on", function()
    local T = H.scope(finally)
    local queue = H.queue("json-bad-request")
    local ran = 0
    local server = T:server(queue, function(value) ran = ran + 1; return {ok = value} end, {codec = "json"})
    local plain = T:client(queue)   -- no codec: sends the bytes as they are
    local reply, message, kind = plain:call("not json {", 5)
    assert.is_nil(reply)
    assert.equal("codec", kind)
    assert.matches("cannot decode the request (codec json)", message, 1, true)
    assert.equal(0, ran)
    local stats = server:stats()
    assert.equal(1, stats.codec_errors)
    assert.equal(0, stats.errors)
    assert.equal(1, stats.replies)
    -- a valid one is handled, on the same server
    assert.equal('{"ok":[1,2]}', plain:call("[1,2]", 5))
    assert.equal(1, ran)
    assert.equal(1, server:stats().codec_errors)
  end)

  it("returns nil, message, 'codec' for a reply that is not JSON, and the client stays usable", function()
    local T = H.scope(finally)
    local queue = H.queue("json-bad-reply")
    T:server(queue, function(body) return body == '"good"' and '{"fine":true}' or "not json" end)
    local client = T:client(queue, {codec = "json"})
    local reply, message, kind = client:call("bad", 5)
    assert.is_nil(reply)
    assert.equal("codec", kind)
    assert.matches("cannot decode the reply (codec json)", message, 1, true)
    assert.equal(1, client:stats().codec_errors)
    assert.same({fine = true}, client:call("good", 5))
    -- through send/wait and call_all too
    local id = client:send("bad")
    reply, message, kind = client:wait(id, 5)
    assert.is_nil(reply)
    assert.equal("codec", kind)
    reply, message, kind = client:call_all({"good", "bad", "good"}, 5)
    assert.is_nil(reply)
    assert.equal("codec", kind)
    assert.matches("^request 2 of 3: cannot decode the reply", message)
    assert.same({{fine = true}, {fine = true}}, client:call_all({"good", "good"}, 5))
  end)

  it("raises a bad argument for a value the codec cannot encode, publishing nothing", function()
    local T = H.scope(finally)
    local queue = H.queue("json-encode")
    local ran = 0
    T:server(queue, function(value) ran = ran + 1; return value end, {codec = "json"})
    local client = T:client(queue, {codec = "json"})
    assert_bad(1, "call", function() client:call({f = print}, 5) end,
               "cannot encode the body (codec json)", "function")
    assert_bad(1, "send", function() client:send({1, {coroutine.create(print)}}) end, "cannot encode")
    assert_bad(1, "call_all", function() client:call_all({{1}, {print}}, 5) end, "bodies[2]: cannot encode")
    assert_bad(1, "call", function() client:call() end, "value expected")
    assert.equal(0, client:stats().calls)
    assert.equal(0, ran)
    assert.same({1, 2}, client:call({1, 2}, 5))   -- the next call works
    assert.equal(1, ran)
  end)

  it("makes a handler result the codec cannot encode a remote error", function()
    local T = H.scope(finally)
    local queue = H.queue("json-encode-reply")
    local server = T:server(queue, function() return {f = print} end, {codec = "json"})
    local client = T:client(queue, {codec = "json"})
    local reply, message, kind = client:call({}, 5)
    assert.is_nil(reply)
    assert.equal("remote", kind)
    assert.matches("cannot encode the handler's reply (codec json)", message, 1, true)
    assert.equal(1, server:stats().errors)
    assert.matches("cannot encode", server:stats().last_error, 1, true)
  end)

  it("makes a codec function that raises, yields or returns the wrong type a failure, never a crash", function()
    local T = H.scope(finally)
    local queue = H.queue("codec-raise")
    local codec = {
      encode = function(v)
        if v == "encode-table" then return {} end
        return v
      end,
      decode = function(s)
        if s == "yield" then coroutine.yield() end
        if s == "error-table" then error({}) end
        if s == "nil" then return nil end
        return s
      end,
    }
    local ran = 0
    local server = T:server(queue, function(v) ran = ran + 1; return v end, {codec = codec})
    local client = T:client(queue, {codec = codec})
    for body, text in pairs {yield = "yield across", ["error-table"] = "error object is a table value",
                             ["nil"] = "decode returned nil"} do
      local reply, message, kind = client:call(body, 5)
      assert.is_nil(reply)
      assert.equal("codec", kind)
      assert.matches("cannot decode the request", message, 1, true)
      assert.matches(text, message, 1, true)
    end
    assert.equal(0, ran)
    assert.equal(3, server:stats().codec_errors)
    assert_bad(1, "call", function() client:call("encode-table", 5) end, "encode returned table")
    -- the client's decode of the reply: the server without a codec echoes raw
    local raw = H.queue("codec-raise-raw")
    T:server(raw, function(body) return body end)
    local client2 = T:client(raw, {codec = codec})
    for _, body in ipairs {"yield", "error-table", "nil"} do
      local reply, message, kind = client2:call(body, 5)
      assert.is_nil(reply)
      assert.equal("codec", kind)
      assert.matches("cannot decode the reply", message, 1, true)
    end
    assert.equal(3, client2:stats().codec_errors)
    assert.equal("fine", client2:call("fine", 5))
  end)

  it("decodes replies in every kind of wait: kept for a later wait, in a handler's thread, in call_all", function()
    local T = H.scope(finally)
    local backend = H.queue("json-backend")
    local front = H.queue("json-front")
    T:server(backend, function(v) return {double = v.n * 2} end, {codec = "json", prefetch = 10})
    local inner = T:client(backend, {codec = "json"})
    -- the front's handler waits on the backend in its own thread (suspended, resumed)
    T:server(front, function(v)
      local r, message, kind = inner:call({n = v.n}, 5)
      if not r then error(message .. " (" .. kind .. ")") end
      return {front = r.double}
    end, {codec = "json", prefetch = 5})
    local client = T:client(front, {codec = "json"})
    assert.same({front = 42}, client:call({n = 21}, 5))
    -- replies that arrive for other ids are kept, then decoded when their wait takes them
    local direct = T:client(backend, {codec = "json"})
    local ids = {}
    for i = 1, 5 do ids[i] = direct:send({n = i}) end
    for i = 5, 1, -1 do assert.same({double = 2 * i}, direct:wait(ids[i], 5)) end
    local all = assert(direct:call_all({{n = 1}, {n = 2}, {n = 3}}, 5))
    assert.same({{double = 2}, {double = 4}, {double = 6}}, all)
  end)

  it("decodes replies, with their properties, for calls in cqueues coroutines (they yield to it)", function()
    local cqueues = require "cqueues"
    local rcq = require "rpc.cqueues"
    local T = H.scope(finally)
    local queue = H.queue("json-cqueues")
    local server = T:server(queue, function(v)
      rpc.sleep(0.1)
      return {got = v}, {headers = {h = "v"}}
    end, {codec = "json", prefetch = 5})
    local cq = cqueues.new()
    rcq.serve(cq, server)
    local results, done = {}, 0
    for i = 1, 3 do
      cq:wrap(function()
        local client = assert(rpc.client(queue, H.opts {codec = "json"}))
        results[i] = {client:call({i = i}, 5, {properties = true})}
        client:close()
        done = done + 1
        if done == 3 then server:close() end  -- ends rcq.serve's coroutine
      end)
    end
    local ok, err = cq:loop()
    assert.is_true(ok, tostring(err))
    for i = 1, 3 do
      assert.same({got = {i = i}}, results[i][1])
      assert.same({content_type = "application/json", headers = {h = "v"}}, own(results[i][2]))
    end
  end)

  it("works with rpc.serve in a child process", function()
    local T = H.scope(finally)
    local queue = H.queue("json-serve")
    local child = T:spawn {queue = queue, code = [[
      local server = assert(rpc.server(QUEUE, function(v) return {len = #v} end, {url = URL, codec = "json"}))
      server:close()   -- declared: the queue exists
      ready()
      print("serve:", rpc.serve(QUEUE, function(v) return {len = #v} end, {url = URL, codec = "json"}))
    ]]}
    child:wait_ready()
    local client = T:client(queue, {codec = "json"})
    assert.same({len = 3}, H.wait_until(function() return client:call({1, 2, 3}, 2) end, 10, "a reply"))
    child:kill("TERM")
    assert.equal(0, child:wait(10))
    assert.matches("serve:%s+true", child:output())
  end)

  it("returns nil, message, 'codec' from rpc.client and rpc.server when lua-cjson is missing", function()
    local out, status, err = H.run_lua([[
      local rpc = require "rpc"
      local url = os.getenv("RPC_URL")
      print(rpc.client("x", {url = url, codec = "json"}))
      print(rpc.server("x", print, {url = url, codec = "json"}))
      -- a custom codec needs nothing
      local c = assert(rpc.client("x", {url = url, codec = {encode = tostring, decode = tostring}}))
      c:close()
      print("custom ok")
    ]], {LUA_CPATH_5_4 = H.BUILD .. "/?.so"})   -- the module, and no system path: no cjson
    assert.equal(0, status, out .. err)
    local expected = "nil\topts.codec 'json' needs lua-cjson (Debian: lua-cjson)\tcodec"
    assert.equal(expected .. "\n" .. expected .. "\ncustom ok\n", out)
  end)

  it("leaves bodies as they are without a codec", function()
    local T = H.scope(finally)
    local queue = H.queue("no-codec")
    T:server(queue, function(body, request) return body .. "|" .. tostring(request.content_type) end)
    local client = T:client(queue)
    assert.equal("[1]|nil", client:call("[1]", 5))
    assert_bad(1, "call", function() client:call({1}) end, "string expected, got table")
  end)

  describe("bad arguments", function()
    local NOWHERE = H.url_with {host = "127.0.0.1", port = 1}  -- a missed check: 'connection'

    it("raise for a codec that is not \"json\" or a table of two functions", function()
      local cases = {
        {42, "option 'codec' must be \"json\" or a table"},
        {true, "got boolean"},
        {"xml", "unknown codec 'xml'"},
        {"JSON", "unknown codec 'JSON'"},
        {"json\0", "unknown codec"},
        {{encode = 1}, "option 'codec.encode' must be a function, got number"},
        {{encode = print}, "option 'codec.decode' must be a function, got nil"},
        {{decode = print}, "option 'codec.encode' must be a function, got nil"},
        {{encode = print, decode = "x"}, "option 'codec.decode' must be a function, got string"},
        {{encode = print, decode = print, extra = 1}, "unknown option 'codec.extra'"},
        {{encode = print, decode = print, [1] = 1}, "option keys of 'codec' must be strings"},
        {{encode = print, decode = print, content_type = 5}, "option 'codec.content_type'"},
        {{encode = print, decode = print, content_type = ("x"):rep(256)}, "at most 255 bytes"},
      }
      for _, case in ipairs(cases) do
        local codec, text = case[1], case[2]
        assert_bad(2, "client", function() rpc.client("q", {url = NOWHERE, codec = codec}) end, text)
        assert_bad(3, "server", function() rpc.server("q", print, {url = NOWHERE, codec = codec}) end, text)
        assert_bad(3, "serve", function() rpc.serve("q", print, {url = NOWHERE, codec = codec}) end, text)
      end
    end)

    it("raise for properties that is not a boolean, and for properties in call_all", function()
      local client = assert(rpc.client(H.queue("props-args"), H.opts()))
      finally(function() client:close() end)
      assert_bad(3, "call", function() client:call("x", 1, {properties = "yes"}) end,
                 "option 'properties' must be a boolean, got string")
      assert_bad(2, "send", function() client:send("x", {properties = 1}) end, "must be a boolean")
      assert_bad(3, "call_all", function() client:call_all({"x"}, 1, {properties = true}) end,
                 "option 'properties' is not for call_all")
      assert_bad(3, "call_all", function() client:call_all({"x"}, 1, {properties = false}) end)
      -- callopts that are not a table are refused before any key is read (true crashed)
      for _, v in ipairs {true, 42, "x", print} do
        assert_bad(3, "call_all", function() client:call_all({"x"}, 1, v) end, "table expected")
      end
    end)
  end)
end)

describe("reply properties", function()
  teardown(H.cleanup)

  it("a handler's content_type and headers reach a caller with properties = true", function()
    local T = H.scope(finally)
    local queue = H.queue("props")
    T:server(queue, function(body)
      return body:upper(), {content_type = "text/plain", headers = {tenant = "acme", n = 7, ok = true, f = 0.5}}
    end)
    local client = T:client(queue)
    local reply, props = client:call("hi", 5, {properties = true})
    assert.equal("HI", reply)
    assert.same({content_type = "text/plain", headers = {tenant = "acme", n = 7, ok = true, f = 0.5}}, own(props))
    -- without properties = true: the reply alone
    assert.equal(1, select("#", client:call("hi", 5)))
    -- a reply without properties of its handler's has only the server's handler time
    local plain = H.queue("props-none")
    T:server(plain, function(body) return body end)
    local r, none = T:client(plain):call("x", 5, {properties = true})
    assert.equal("x", r)
    assert.same({}, own(none))
  end)

  it("send with properties = true, then wait, returns them, also for a reply kept for a later wait", function()
    local T = H.scope(finally)
    local queue = H.queue("props-send")
    T:server(queue, function(body) return body, {headers = {body = body}} end, {prefetch = 10})
    local client = T:client(queue)
    local ids = {}
    for i = 1, 4 do ids[i] = client:send(tostring(i), {properties = i % 2 == 1}) end
    for i = 4, 1, -1 do   -- the later ones are waited for first: the others are kept meanwhile
      local reply, props = client:wait(ids[i], 5)
      assert.equal(tostring(i), reply)
      if i % 2 == 1 then
        assert.same({headers = {body = tostring(i)}}, own(props))
      else
        assert.is_nil(props)
      end
    end
  end)

  it("failures still return nil, message, kind with properties = true", function()
    local T = H.scope(finally)
    local client = T:client(H.queue("props-nobody"))
    local reply, message, kind = client:call("x", 2, {properties = true})
    assert.is_nil(reply)
    assert.equal("no_route", kind)
    assert.is_string(message)
    local queue = H.queue("props-raise")
    T:server(queue, function() error("no luck", 0) end)
    reply, message, kind = T:client(queue):call("x", 5, {properties = true})
    assert.is_nil(reply)
    assert.equal("no luck", message)
    assert.equal("remote", kind)
  end)

  it("a json server's reply carries application/json unless the handler sets content_type", function()
    local T = H.scope(finally)
    local queue = H.queue("props-json")
    T:server(queue, function(v)
      if v.own then return {own = true}, {content_type = "application/vnd.own+json", headers = {v = 1}} end
      return {own = false}
    end, {codec = "json"})
    local client = T:client(queue, {codec = "json"})
    local reply, props = client:call({own = false}, 5, {properties = true})
    assert.same({own = false}, reply)
    assert.same({content_type = "application/json"}, own(props))
    reply, props = client:call({own = true}, 5, {properties = true})
    assert.same({own = true}, reply)
    assert.same({content_type = "application/vnd.own+json", headers = {v = 1}}, own(props))
  end)

  it("a bad properties table is a handler error reply, and the server serves on", function()
    local T = H.scope(finally)
    local queue = H.queue("props-bad")
    local cases = {
      {{colour = "red"}, "unknown key 'colour'"},
      {{[setmetatable({}, {__tostring = function() error("never run") end})] = 1}, "unknown key of type table"},
      {{content_type = 5}, "content_type must be a string"},
      {{content_type = ("x"):rep(256)}, "at most 255 bytes"},
      {{headers = "x"}, "headers must be a table, got string"},
      {{headers = {f = print}}, "headers: entry 'f' must be a string, number or boolean, got function"},
      {{headers = {[1] = "x"}}, "headers: table keys must be strings"},
      {{headers = {nan = 0/0}}, "finite"},
      {{headers = {["x-rpc-error"] = "fake"}}, "'x-rpc-error' is reserved"},
      {{headers = {["x-rpc-error-kind"] = "codec"}}, "'x-rpc-error-kind' is reserved"},
      {setmetatable({}, {__index = function() error("never read") end}), nil},  -- read raw: fine
    }
    local current
    local server = T:server(queue, function() return "body", cases[current][1] end)
    local client = T:client(queue)
    for i, case in ipairs(cases) do
      current = i
      local reply, message, kind = client:call("x", 5, {properties = true})
      if case[2] then
        assert.is_nil(reply, case[2])
        assert.equal("remote", kind)
        assert.matches("handler returned bad reply properties: ", message, 1, true)
        assert.matches(case[2], message, 1, true)
      else
        assert.equal("body", reply)
      end
    end
    assert.equal(#cases - 1, server:stats().errors)
    assert.matches("bad reply properties", server:stats().last_error, 1, true)
  end)

  it("ignores a second value that is not a table, as handlers did before reply properties", function()
    local T = H.scope(finally)
    local queue = H.queue("props-not-table")
    local seconds = {"extra", 42, 0.5, true, false, print, coroutine.create(print), io.stdout}
    local current
    local server = T:server(queue, function(body)
      if current then return body, seconds[current] end
      return body:gsub("a", "b")   -- the body, and the count of replacements
    end)
    local client = T:client(queue)
    local reply, props = client:call("banana", 5, {properties = true})
    assert.equal("bbnbnb", reply)
    assert.same({}, own(props))
    for i = 1, #seconds do
      current = i
      reply, props = client:call("x", 5, {properties = true})
      assert.equal("x", reply, tostring(seconds[i]))
      assert.same({}, own(props))
    end
    assert.equal(0, server:stats().errors)
    assert.equal(#seconds + 1, server:stats().replies)
  end)

  it("a finalizer closing the client while a kept reply's properties are read leaves nothing dangling", function()
    local queue = H.queue("props-gc-close")
    -- in a child: a defect here is a crash (a read of the freed message)
    local out, status, err = H.run_lua([[
      io.stdout:setvbuf("line")
      local rpc = require "rpc"
      local system = require "system"
      local URL, QUEUE = os.getenv("RPC_URL"), os.getenv("SPEC_QUEUE")
      local headers = {}
      for i = 1, 50 do headers["h" .. i] = ("v"):rep(i) end
      local server = assert(rpc.server(QUEUE, function(body) return "re:" .. body, {headers = headers} end,
                                       {url = URL, auto_delete = true}))
      local client = assert(rpc.client(QUEUE, {url = URL, timeout = 5}))
      assert(client:send("early", {properties = true}))   -- its reply is kept when read
      assert(server:poll(5) == 1, "the server did not get the request")
      system.sleep(1.2)   -- quiet for over 1 s: call reads (and keeps that reply) before publishing
      local ran
      -- a whole cycle at every allocation check: the first allocation of the keep collects the
      -- garbage below and runs its finalizer
      collectgarbage("incremental", 1, 1000, 30)
      collectgarbage("collect")
      collectgarbage("stop")
      setmetatable({}, {__gc = function() ran = true; client:close() end})
      collectgarbage("restart")
      local reply, message, kind = client:call("late", 2)
      collectgarbage("incremental", 200, 100, 13)
      print("CALL", tostring(reply), tostring(message), tostring(kind))
      print("FINALIZER", tostring(ran), collectgarbage("isrunning"))
      server:close()
      print("DONE")
    ]], {SPEC_QUEUE = queue})
    assert.equal(0, status, out .. err)
    assert.matches("CALL\tnil\t[^\n]*closed[^\n]*\tclosed\n", out)
    assert.matches("FINALIZER\ttrue\ttrue\n", out)
    assert.matches("DONE", out, 1, true)
  end)

  it("headers over the caps a request has arrive as headers_too_large = true", function()
    local T = H.scope(finally)
    local queue = H.queue("props-many")
    local many = {}
    for i = 1, 1100 do many["k" .. i] = i end
    T:server(queue, function(body) return body, {headers = many} end)
    local reply, props = T:client(queue):call("x", 5, {properties = true})
    assert.equal("x", reply)
    assert.same({headers_too_large = true}, props)
  end)
end)

describe("codec interop #interop", function()
  teardown(H.cleanup)

  it("a pika caller sends JSON to a json Lua server and gets JSON as application/json", function()
    local T = H.scope(finally)
    local queue = H.queue("json-pika")
    local server = T:spawn {queue = queue, code = [[
      local server = assert(rpc.server(QUEUE, function(v, request)
        return {sum = v.a + v.b, tags = v.tags, seen_type = request.content_type}
      end, {url = URL, codec = "json"}))
      ready()
      server:run()
    ]]}
    server:wait_ready()
    local out, status, err = H.run(H.PYTHON .. " -c " .. H.quote([[
import json, os, sys, pika
conn = pika.BlockingConnection(pika.URLParameters(os.environ["RPC_URL"]))
ch = conn.channel()
replies = ch.queue_declare(queue="", exclusive=True).method.queue
body = json.dumps({"a": 2, "b": 40, "tags": ["x", "\u00e9\u2603"]}).encode()
ch.basic_publish(exchange="", routing_key=os.environ["RPC_QUEUE"], body=body,
                 properties=pika.BasicProperties(reply_to=replies, correlation_id="cid-json",
                                                 content_type="application/json"))
for method, props, reply in ch.consume(replies, auto_ack=True, inactivity_timeout=10):
    break
if method is None: sys.exit("no reply")
print(json.dumps({"cid": props.correlation_id, "content_type": props.content_type,
                  "reply": json.loads(reply)}))
]]), {RPC_QUEUE = queue, RPC_URL = H.URL})
    assert.equal(0, status, out .. err)
    local got = require("dkjson").decode(out)
    assert.equal("cid-json", got.cid)
    assert.equal("application/json", got.content_type)
    assert.equal(42, got.reply.sum)
    assert.same({"x", "é☃"}, got.reply.tags)
    assert.equal("application/json", got.reply.seen_type)
  end)
end)
