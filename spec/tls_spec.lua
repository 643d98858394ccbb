-- TLS (amqps://) against a second private node of its own, with a TLS listener: certificates
-- from spec/support/make_certs.sh, the node from scripts/broker.sh (RPC_BROKER_TLS_PORT), in this
-- run's scratch folder. Teardown stops that node only; the spec broker is not touched.
local H = require "support.helpers"

local PORT, TLS_PORT = 5683, 5684                    -- the node's plain and TLS listeners
local USER, PASSWORD = "spec-tls", "pw-" .. H.hex(8)  -- a password no message may show
local CONNECT_TIMEOUT = 5
local FAST = 1.5                                      -- "at once": well under CONNECT_TIMEOUT

local certs, env, started

local function url(host, port, scheme)
  return ("%s://%s:%s@%s:%d/"):format(scheme or "amqps", USER, PASSWORD, host or "localhost",
                                      port or TLS_PORT)
end
local URL = url()

local function cert(name) return certs .. "/" .. name end

--- rabbitmqctl on the TLS node; raises if it fails.
local function ctl(...)
  local words = {}
  for i, a in ipairs {...} do words[i] = H.quote(a) end
  local out, status, err = H.run(H.quote(H.BROKER) .. " ctl -q " .. table.concat(words, " "), env)
  assert(status == 0, "rabbitmqctl " .. table.concat({...}, " ") .. " failed: " .. out .. err)
  return out
end

--- The TLS node's connections: one table per connection, fields as named.
local function connections(...)
  local fields, rows = {...}, {}
  for line in ctl("list_connections", ...):gmatch("[^\n]+") do
    local row, i = {}, 0
    for value in (line .. "\t"):gmatch("([^\t]*)\t") do
      i = i + 1
      if fields[i] then row[fields[i]] = value end
    end
    rows[#rows + 1] = row
  end
  return rows
end

--- Options for the TLS node: url (amqps://localhost), connect_timeout, tls = {ca = ca.pem}.
local function opts(extra)
  local t = {url = URL, connect_timeout = CONNECT_TIMEOUT, tls = {ca = cert("ca.pem")}}
  for k, v in pairs(extra or {}) do t[k] = v end
  return t
end

local function kinds_text(kinds)
  local list = {}
  for k in pairs(kinds) do list[#list + 1] = k end
  table.sort(list)
  return table.concat(list, " or ")
end

--- make(o) must fail at once (well under connect_timeout) with kind (a string, or a set of
-- kinds), without the password in its message; returns the message.
local function fails_fast(make, o, kind)
  local kinds = type(kind) == "table" and kind or {[kind] = true}
  local elapsed, object, message, got = H.timed(make, o)
  if object then object:close() end
  assert.is_nil(object, "it connected")
  assert.is_truthy(kinds[got], ("kind %s, expected %s: %s"):format(tostring(got), kinds_text(kinds),
                                                                     tostring(message)))
  assert.is_string(message)
  assert.is_true(elapsed < FAST, ("took %.3f s, connect_timeout %d"):format(elapsed, CONNECT_TIMEOUT))
  H.assert_no_password(message, o.url)
  return message
end

local function client(o)
  return require("rpc").client("spec-tls-" .. H.hex(4), o)
end

local function server(o)
  return require("rpc").server("spec-tls-" .. H.hex(4), function(body) return body end, o)
end

--- A client that must connect (raises with its message otherwise), closed by T.
local function connected(T, queue, o)
  local c, message, kind = require("rpc").client(queue, o)
  if not c then error(("rpc.client failed: %s (%s)"):format(message, kind), 2) end
  T:defer(function() c:close() end)
  return c
end

describe("TLS", function()
  setup(function()
    certs = H.tmpdir() .. "/tls-certs"
    local out, status, err = H.run(H.quote(H.ROOT .. "/spec/support/make_certs.sh") .. " " .. H.quote(certs))
    assert(status == 0, "make_certs.sh failed: " .. out .. err)
    env = {RPC_BROKER_PORT = tostring(PORT), RPC_BROKER_TLS_PORT = tostring(TLS_PORT),
           RPC_BROKER_TLS_DIR = certs, RPC_BROKER_DIR = H.tmpdir() .. "/tls-broker"}
    started = true   -- even a failed start may leave a node to stop
    out, status, err = H.run(H.quote(H.BROKER) .. " start", env)
    assert(status == 0, "the TLS node did not start: " .. out .. err)
    ctl("add_user", USER, PASSWORD)
    ctl("set_permissions", "-p", "/", USER, ".*", ".*", ".*")
  end)

  teardown(function()
    if started then H.run(H.quote(H.BROKER) .. " stop", env) end
    H.cleanup()
  end)

  it("calls through a verified TLS connection: small, 1 MiB and 10 pipelined, over TLS 1.2+", function()
    local T = H.scope(finally)
    local queue = "spec-tls-echo-" .. H.hex(4)
    T:server(queue, function(body) return body end, opts())
    local c = connected(T, queue, opts())
    assert.equal(1, tostring(c):find("rpc.client (amqps://" .. USER .. "@localhost:" .. TLS_PORT .. "/", 1, true))
    H.assert_no_password(tostring(c), URL)
    assert.equal("hello", c:call("hello", 5))
    local big = {}
    for i = 1, 1024 * 1024 / 16 do big[i] = ("%015d\n"):format(i) end
    big = table.concat(big)
    assert.equal(1024 * 1024, #big)
    assert.is_true(big == c:call(big, 10), "the 1 MiB reply differs from the request")
    local ids = {}
    for i = 1, 10 do ids[i] = assert(c:send("p" .. i)) end
    for i = 1, 10 do assert.equal("p" .. i, c:wait(ids[i], 5)) end

    local rows = connections("user", "ssl", "ssl_protocol")
    local ours = 0
    for _, row in ipairs(rows) do
      if row.user == USER then
        ours = ours + 1
        assert.equal("true", row.ssl)
        assert.is_truthy(row.ssl_protocol == "tlsv1.2" or row.ssl_protocol == "tlsv1.3", row.ssl_protocol)
      end
    end
    assert.is_true(ours >= 2, ("the node lists %d connections of %s, expected the client's and the server's")
      :format(ours, USER))
  end)

  it("reconnects over TLS after the broker closes the connections", function()
    local T = H.scope(finally)
    local queue = "spec-tls-again-" .. H.hex(4)
    T:server(queue, function(body) return "again:" .. body end, opts())
    local c = connected(T, queue, opts())
    assert.equal("again:1", c:call("1", 5))
    ctl("close_all_connections", "spec: reconnect over TLS")
    local reply = H.wait_until(function() return c:call("2", 2) end, 15, "a call after the reconnect")
    assert.equal("again:2", reply)
  end)

  it("returns nil, message, 'tls' when the broker's certificate is not signed by tls.ca", function()
    local message = fails_fast(client, opts {tls = {ca = cert("other_ca.pem")}}, "tls")
    assert.matches("certificate", message, 1, true)
    assert.matches("verif", message, 1, true)
    assert.matches("localhost:" .. TLS_PORT, message, 1, true)
    message = fails_fast(server, opts {tls = {ca = cert("other_ca.pem")}}, "tls")
    assert.matches("certificate", message, 1, true)
  end)

  it("returns 'tls' without tls.ca: the system's store does not know the test CA", function()
    local message = fails_fast(client, opts {tls = {}}, "tls")
    assert.matches("certificate", message, 1, true)
    assert.matches("verif", message, 1, true)
    message = fails_fast(client, {url = URL, connect_timeout = CONNECT_TIMEOUT}, "tls")  -- no tls at all
    assert.matches("certificate", message, 1, true)
  end)

  it("returns 'tls' when the host name is not the certificate's, and connects with verify_hostname = false", function()
    local numeric = url("127.0.0.1")  -- server.pem is for DNS name localhost only
    local message = fails_fast(client, opts {url = numeric}, "tls")
    assert.matches("host", message, 1, true)
    assert.matches("127.0.0.1", message, 1, true)
    local T = H.scope(finally)
    local queue = "spec-tls-ip-" .. H.hex(4)
    T:server(queue, function(body) return "ip:" .. body end,
             opts {url = numeric, tls = {ca = cert("ca.pem"), verify_hostname = false}})
    local c = connected(T, queue, opts {url = numeric, tls = {ca = cert("ca.pem"), verify_hostname = false}})
    assert.equal("ip:x", c:call("x", 5))
  end)

  it("does not verify the broker only when asked: verify = false", function()
    fails_fast(client, opts {tls = {ca = cert("other_ca.pem"), verify_hostname = false}}, "tls")
    local T = H.scope(finally)
    local queue = "spec-tls-noverify-" .. H.hex(4)
    local unverified = {ca = cert("other_ca.pem"), verify = false, verify_hostname = false}
    T:server(queue, function(body) return "nv:" .. body end, opts {tls = unverified})
    local c = connected(T, queue, opts {tls = unverified})
    assert.equal("nv:x", c:call("x", 5))
  end)

  it("presents a client certificate from tls.cert and tls.key", function()
    local T = H.scope(finally)
    local queue = "spec-tls-cert-" .. H.hex(4)
    T:server(queue, function(body) return "cert:" .. body end, opts())
    local c = connected(T, queue,
      opts {tls = {ca = cert("ca.pem"), cert = cert("client.pem"), key = cert("client.key")}})
    assert.equal("cert:x", c:call("x", 5))
    local seen = false
    for _, row in ipairs(connections("user", "peer_cert_subject")) do
      seen = seen or (row.user == USER and row.peer_cert_subject:find("CN=rabbitrpc test client", 1, true))
    end
    assert.is_truthy(seen, "the node does not list a connection with the client certificate")
  end)

  it("returns 'tls' when the broker refuses the client certificate", function()
    local message = fails_fast(client,
      opts {tls = {ca = cert("ca.pem"), cert = cert("other_client.pem"), key = cert("other_client.key")}},
      "tls")
    assert.is_truthy(message:find("unknown ca", 1, true) or message:find("certificate", 1, true), message)
  end)

  it("returns 'tls' naming the file when tls.ca, tls.cert or tls.key cannot be used", function()
    local missing = H.tmpdir() .. "/no-such-dir/"
    local function says_missing(message)  -- the file's name, and why: strerror(ENOENT)
      assert.is_truthy(message:lower():find("no such file", 1, true), "does not say why: " .. message)
    end
    local message = fails_fast(client, opts {tls = {ca = missing .. "ca.pem"}}, "tls")
    assert.matches(missing .. "ca.pem", message, 1, true)
    says_missing(message)
    message = fails_fast(client,
      opts {tls = {ca = cert("ca.pem"), cert = missing .. "client.pem", key = cert("client.key")}}, "tls")
    assert.matches(missing .. "client.pem", message, 1, true)
    says_missing(message)
    message = fails_fast(client,
      opts {tls = {ca = cert("ca.pem"), cert = cert("client.pem"), key = missing .. "client.key"}}, "tls")
    assert.matches(missing .. "client.key", message, 1, true)
    says_missing(message)
    message = fails_fast(client,   -- a certificate and a key that do not belong together
      opts {tls = {ca = cert("ca.pem"), cert = cert("client.pem"), key = cert("server.key")}}, "tls")
    assert.matches("client.pem", message, 1, true)
    message = fails_fast(client, opts {tls = {ca = cert("ca.key")}}, "tls")  -- not a certificate
    assert.matches("ca.key", message, 1, true)
    message = fails_fast(server, opts {tls = {ca = missing .. "ca.pem"}}, "tls")
    assert.matches(missing .. "ca.pem", message, 1, true)
  end)

  it("raises bad argument for tls options with an amqp:// url, or malformed", function()
    local rpc = require "rpc"
    local plain = url("localhost", PORT, "amqp")
    assert.matches("bad argument #2 to 'client' %(.*amqps://",
      H.error_of(function() rpc.client("q", opts {url = plain}) end))
    assert.matches("bad argument #3 to 'server' %(.*amqps://",
      H.error_of(function() rpc.server("q", function() end, opts {url = plain}) end))
    assert.matches("bad argument #2 to 'client' %(.*cafile",
      H.error_of(function() rpc.client("q", opts {tls = {cafile = cert("ca.pem")}}) end))
    assert.matches("bad argument #3 to 'server' %(.*cafile",
      H.error_of(function() rpc.server("q", function() end, opts {tls = {cafile = cert("ca.pem")}}) end))
    assert.matches("bad argument #2 to 'client' %(.*tls",
      H.error_of(function() rpc.client("q", opts {tls = cert("ca.pem")}) end))
    assert.matches("bad argument #2 to 'client' %(.*verify",
      H.error_of(function() rpc.client("q", opts {tls = {verify = "no"}}) end))
  end)

  it("fails at once, not after connect_timeout, when plain AMQP meets the TLS port or TLS the plain port", function()
    local message = fails_fast(client, {url = url("localhost", TLS_PORT, "amqp"), connect_timeout = CONNECT_TIMEOUT},
                               {connection = true, tls = true})
    assert.matches("localhost:" .. TLS_PORT, message, 1, true)
    message = fails_fast(client, opts {url = url("localhost", PORT)}, {connection = true, tls = true})
    assert.matches("localhost:" .. PORT, message, 1, true)
  end)

  it("takes port 5671 for an amqps:// url without one", function()
    local c, message = require("rpc").client("q", {url = "amqps://" .. USER .. ":" .. PASSWORD .. "@localhost/",
      connect_timeout = CONNECT_TIMEOUT, tls = {ca = cert("ca.pem")}})
    if c then c:close() end
    assert.is_nil(c)   -- nothing of ours listens on 5671
    assert.matches("localhost:5671", message, 1, true)
    H.assert_no_password(message, URL)
  end)
end)
