-- The LuaLS definition files in types/ (README "Editor support") against the real module: every
-- function, method and metamethod the objects have is declared, every parameter annotated, every
-- key of the options tables the C core checks (and of the tables it returns) is a field of its
-- class, and every error kind the C core returns is in rpc.ErrorKind. A method, option or kind
-- added in C without its annotation fails here.
local H = require "support.helpers"
local rpc = require "rpc"

local META = H.ROOT .. "/types/rpc.lua"
local META_CQUEUES = H.ROOT .. "/types/rpc/cqueues.lua"

-- the metatables the C core registers (luaL_newmetatable) -> the local name of their class in
-- types/rpc.lua (`---@class rpc.Client` / `local Client = {}` / `function Client:call(...)`)
local CLASSES = {["rpc.client"] = "Client", ["rpc.server"] = "Server", ["rpc.connection"] = "Connection"}

-- Declared while being added on another branch: not yet required to exist in the objects.
-- (Only the "declares nothing the objects lack" check skips them; drop a name once it exists.)
local PENDING = {}

-- Declared while being added on another branch: fields the C lists do not have yet.
local PENDING_FIELDS = {}

-- The key lists the C core checks options tables against (opts_check_keys), and the tables it
-- builds, -> the class of types/rpc.lua that must declare each of their keys as a field.
local KEY_LISTS = {
  {"client.c", "client_options", "rpc.ClientOptions"},
  {"server.c", "server_options", "rpc.ServerOptions"},
  {"messaging.c", "connect_options", "rpc.ConnectOptions"},
  {"client.c", "call_options", "rpc.CallOptions"},
  {"client.c", "send_options", "rpc.SendOptions"},
  {"connection.c", "tls_options", "rpc.TlsOptions"},
  {"server.c", "bind_options", "rpc.Binding"},
  {"messaging.c", "exchange_options", "rpc.ExchangeOptions"},
  {"messaging.c", "queue_options", "rpc.QueueOptions"},
  {"messaging.c", "consume_options", "rpc.ConsumeOptions"},
  {"messaging.c", "delete_queue_options", "rpc.DeleteQueueOptions"},
  {"messaging.c", "delete_exchange_options", "rpc.DeleteExchangeOptions"},
  {"messaging.c", "property_names", "rpc.PublishProperties"},
}
local BUILT_TABLES = {
  {"server.c", {"push_request"}, "rpc.Request"},
  {"messaging.c", {"push_message", "push_properties"}, "rpc.Message"},
  {"client.c", {"client_stats"}, "rpc.ClientStats"},
  {"server.c", {"server_stats"}, "rpc.ServerStats"},
  {"histogram.c", {"set_figures"}, "rpc.Latency", 5},  -- stats' latency and handler_time
}

--- {["rpc.X"] = {field = true, ...}} for every ---@class of the file, inherited fields included.
local function class_fields(path)
  local classes, parents, current = {}, {}, nil
  for line in (assert(H.read_file(path)) .. "\n"):gmatch("(.-)\n") do
    local class, parent = line:match("^%-%-%-@class ([%w_.]+):? ?([%w_.]*)")
    local field = line:match("^%-%-%-@field ([%w_]+)")
    if class then
      current, classes[class] = class, {}
      if parent ~= "" then parents[class] = parent end
    elseif field and current then
      classes[current][field] = true
    elseif not line:match("^%-%-%-") then
      current = nil
    end
  end
  local function all(class)
    local t = {}
    if parents[class] then for k in pairs(all(parents[class])) do t[k] = true end end
    for k in pairs(classes[class] or {}) do t[k] = true end
    return t
  end
  local resolved = {}
  for class in pairs(classes) do resolved[class] = all(class) end
  return resolved
end

--- The strings of `static const char *const name[] = {...}` in csrc/file.
local function c_key_list(file, name)
  local src = assert(H.read_file(H.ROOT .. "/csrc/" .. file))
  local list = assert(src:match("static const char %*const " .. name .. "%[%] = (%b{})"),
    "no key list " .. name .. " in csrc/" .. file)
  local keys = {}
  for k in list:gmatch('"([%w_]+)"') do keys[#keys + 1] = k end
  return keys
end

--- The keys the C function `name` of csrc/file sets in the table it builds: set_*(L, "key", ...),
-- rpc_set_count(L, "key", ...), lua_setfield(L, -n, "key").
local function c_built_keys(file, name)
  local src = assert(H.read_file(H.ROOT .. "/csrc/" .. file))
  local body = assert(src:match("\nstatic [%w_ ]+%*?" .. name .. "%b()%s*(%b{})"),
    "no function " .. name .. " in csrc/" .. file)
  local keys = {}
  for k in body:gmatch('set_[%w_]+%(L, "([%w_]+)"') do keys[#keys + 1] = k end
  for k in body:gmatch('lua_setfield%(L, %-%d, "([%w_]+)"%)') do keys[#keys + 1] = k end
  return keys
end

--- What a definition file declares: {functions = {["rpc.client"] = {params...}, ["Client:call"]
-- = {...}}, fields = {["rpc._VERSION"] = true}, params = {[name] = {annotated = true}}}.
local function declarations(path)
  local text = assert(H.read_file(path), "cannot read " .. path)
  local decl = {functions = {}, fields = {}, annotated = {}, order = {}}
  local doc = {}   -- the ---@param names of the comment block above the current line
  for line in (text .. "\n"):gmatch("(.-)\n") do
    local param = line:match("^%-%-%-@param ([%w_]+%??)")
    local owner, sep, name, args = line:match("^function ([%w_]+)([.:])([%w_]+)%(([^)]*)%)")
    local field_owner, field = line:match("^([%w_]+)%.([%w_]+) =")
    if param then
      doc[param:gsub("%?$", "")] = true
    elseif owner then
      local key = owner .. sep .. name
      local list = {}
      for a in args:gmatch("[%w_]+") do list[#list + 1] = a end
      decl.functions[key] = list
      decl.annotated[key] = doc
      decl.order[#decl.order + 1] = key
      doc = {}
    elseif field_owner then
      decl.fields[field_owner .. "." .. field] = true
      doc = {}
    elseif not line:match("^%-%-%-") then
      doc = {}
    end
  end
  return decl
end

--- The names in `names` that decl lacks: rpc.x for module functions (or fields, for
-- non-functions), Class:x for methods.
local function undeclared(decl, names)
  local missing = {}
  for _, name in ipairs(names) do
    if not (decl.functions[name] or decl.fields[name]) then missing[#missing + 1] = name end
  end
  table.sort(missing)
  return missing
end

--- "rpc.x" for every key of the module table.
local function module_names(module, prefix)
  local names = {}
  for k in pairs(module) do names[#names + 1] = prefix .. "." .. k end
  table.sort(names)
  return names
end

--- "Class:x" for every method (the metatable's __index) and every metamethod but __gc (which
-- Lua calls, never a user) of the metatable registered as mt_name.
local function method_names(mt_name)
  local mt = assert(debug.getregistry()[mt_name], "no metatable " .. mt_name .. " registered")
  local class, names = CLASSES[mt_name], {}
  assert.is_table(mt.__index)
  for k, v in pairs(mt.__index) do
    if type(v) == "function" then names[#names + 1] = class .. ":" .. k end
  end
  for k, v in pairs(mt) do
    if type(v) == "function" and k ~= "__gc" then names[#names + 1] = class .. ":" .. k end
  end
  table.sort(names)
  return names
end

--- Every error kind the C sources return: the literal kinds of rpc_fail(L, "kind", ...),
-- conn_lost(c, "kind", ...) (a ternary's too), fail_all(..., "kind", ...), kind = "kind",
-- publish_reply(..., "kind"), a "kind" pushed just before `return 3`, and the string
-- literals that the kind-naming functions (remote_kind, kind_of_close) return.
local function kinds_in_c()
  local kinds = {}
  local files = assert(io.popen("ls " .. H.quote(H.ROOT) .. "/csrc/*.c"))
  for path in files:lines() do
    local src = assert(H.read_file(path))
    local function add(pattern)
      for k in src:gmatch(pattern) do kinds[k] = kinds[k] or path:match("[^/]+$") end
    end
    add('rpc_fail%(L, "([%w_]+)"')
    add('conn_lost%([^,]+, "([%w_]+)"')
    add('conn_lost%([^,]+, [^",;]-%? "([%w_]+)" :')
    add('fail_all%([^;"]-, "([%w_]+)"')
    add('kind = "([%w_]+)"')
    add('publish_reply%([^;]-, "([%w_]+)"%)')
    add('lua_pushliteral%(L, "([%w_]+)"%);%s*return 3;')
    for body in src:gmatch("static const char %*[%w_]*kind[%w_]*%b()%s*(%b{})") do
      for ret in body:gmatch("return ([^;]*);") do
        for k in ret:gmatch('"([%w_]+)"') do kinds[k] = kinds[k] or path:match("[^/]+$") end
      end
    end
  end
  files:close()
  return kinds
end

--- The string literals of the rpc.ErrorKind alias.
local function alias_kinds()
  local text = assert(H.read_file(META))
  local block = assert(text:match("%-%-%-@alias rpc%.ErrorKind\n(.-)\n[^-]"), "no rpc.ErrorKind alias")
  local kinds = {}
  for k in block:gmatch('%-%-%-| "([%w_]+)"') do kinds[k] = true end
  return kinds
end

--- The kinds of README.md's "Error kinds" table.
local function readme_kinds()
  local readme = assert(H.read_file(H.ROOT .. "/README.md"))
  local section = assert(readme:match("\n## Error kinds\n(.-)\n## "), "README has no Error kinds section")
  local kinds = {}
  for k in section:gmatch("\n| `([%w_]+)` |") do kinds[#kinds + 1] = k end
  return kinds
end

--- The paths of the rpc/core.so files this process has mapped (/proc/self/maps), resolved.
local function mapped_cores()
  local paths, seen = {}, {}
  for line in assert(io.open("/proc/self/maps")):lines() do
    local path = line:match("%s(/%S*/rpc/core%.so)$")
    if path and not seen[path] then
      seen[path] = true
      paths[#paths + 1] = path
    end
  end
  return paths
end

--- The checkout's version: csrc/rpc.h's RPC_VERSION.
local function source_version()
  return assert(assert(H.read_file(H.ROOT .. "/csrc/rpc.h")):match('#define RPC_VERSION "([^"]+)"'),
                "no RPC_VERSION in csrc/rpc.h")
end

describe("types/rpc.lua (LuaLS definitions)", function()
  teardown(H.cleanup)

  it("is checked against the module built in this checkout, not one installed elsewhere", function()
    -- a stale rpc/core.so earlier on the cpath (a luarocks install, ./rpc/core.so left by a
    -- luarocks make) would make every check below compare the definitions with another module
    local built = assert(io.popen("realpath -e " .. H.quote(H.BUILD .. "/rpc/core.so") .. " 2>/dev/null")):read("l")
    assert.is_string(built, "no module built at " .. H.BUILD .. "/rpc/core.so (make)")
    assert.same({built}, mapped_cores())
    assert.equal("rabbitrpc " .. source_version(), rpc._VERSION)
  end)

  it("loads as Lua and, run, returns a table with the module's functions", function()
    for _, path in ipairs {META, META_CQUEUES} do
      local chunk, err = loadfile(path)
      assert.is_function(chunk, err)
    end
    local stub = dofile(META)
    for _, name in ipairs {"client", "server", "serve", "connect", "sleep"} do
      assert.is_function(stub[name], name)
    end
    assert.equal("rabbitrpc " .. source_version(), stub._VERSION)   -- the checkout's, whatever was loaded
    assert.equal(rpc._VERSION, stub._VERSION)
  end)

  it("declares every key of the rpc module table", function()
    assert.same({}, undeclared(declarations(META), module_names(rpc, "rpc")))
  end)

  it("declares every method and metamethod of clients, servers and rpc.connect connections", function()
    local T = H.scope(finally)
    -- the metatables are read from the registry; real objects show they are the ones used
    local queue = H.queue("meta")
    local server = assert(rpc.server(queue, function(body) return body end, H.opts {auto_delete = true}))
    T:defer(function() server:close() end)
    local client = assert(rpc.client(queue, H.opts()))
    T:defer(function() client:close() end)
    local conn = assert(rpc.connect(H.opts()))
    T:defer(function() conn:close() end)
    local registry = debug.getregistry()
    assert.equal(registry["rpc.client"], getmetatable(client))
    assert.equal(registry["rpc.server"], getmetatable(server))
    assert.equal(registry["rpc.connection"], getmetatable(conn))

    local decl = declarations(META)
    for mt_name in pairs(CLASSES) do
      local names = method_names(mt_name)
      assert.is_true(#names >= 8, mt_name .. " has too few methods to be real")
      assert.same({}, undeclared(decl, names), mt_name)
    end
  end)

  it("declares rpc.cqueues's functions in types/rpc/cqueues.lua", function()
    local ok, rcq = pcall(require, "rpc.cqueues")
    assert(ok, "rpc.cqueues needs lua-cqueues (scripts/deps.sh installs it): " .. tostring(rcq))
    local decl = declarations(META_CQUEUES)
    local names = {}
    for k in pairs(rcq) do names[#names + 1] = "cqueues." .. k end  -- `local cqueues = {}` there
    assert.same({}, undeclared(decl, names))
  end)

  it("declares nothing the objects lack (but names another branch is adding)", function()
    local real = {}
    for _, name in ipairs(module_names(rpc, "rpc")) do real[name] = true end
    for mt_name in pairs(CLASSES) do
      for _, name in ipairs(method_names(mt_name)) do real[name] = true end
    end
    local decl, extra = declarations(META), {}
    for _, name in ipairs(decl.order) do
      if not real[name] and not PENDING[name] then extra[#extra + 1] = name end
    end
    for name in pairs(decl.fields) do
      if not real[name] then extra[#extra + 1] = name end
    end
    assert.same({}, extra)
  end)

  it("annotates every parameter of every declared function with ---@param", function()
    for _, path in ipairs {META, META_CQUEUES} do
      local decl, bare = declarations(path), {}
      for name, params in pairs(decl.functions) do
        for _, p in ipairs(params) do
          if not decl.annotated[name][p] then bare[#bare + 1] = name .. "(" .. p .. ")" end
        end
      end
      table.sort(bare)
      assert.same({}, bare, path)
    end
  end)

  it("declares as fields every key of the options tables the C core checks, and no other", function()
    local classes, missing, extra = class_fields(META), {}, {}
    for _, entry in ipairs(KEY_LISTS) do
      local file, list, class = entry[1], entry[2], entry[3]
      local fields = assert(classes[class], "no ---@class " .. class)
      local in_c = {}
      for _, key in ipairs(c_key_list(file, list)) do
        in_c[key] = true
        if not fields[key] then missing[#missing + 1] = class .. "." .. key .. " (" .. list .. ")" end
      end
      for field in pairs(fields) do
        if not in_c[field] and not PENDING_FIELDS[class .. "." .. field] then
          extra[#extra + 1] = class .. "." .. field
        end
      end
    end
    table.sort(missing)
    table.sort(extra)
    assert.same({}, missing)
    assert.same({}, extra)
  end)

  it("declares as fields every key of the tables the C core returns (request, message, stats)", function()
    local classes, missing = class_fields(META), {}
    for _, entry in ipairs(BUILT_TABLES) do
      local file, functions, class = entry[1], entry[2], entry[3]
      local fields, n = assert(classes[class], "no ---@class " .. class), 0
      for _, fn in ipairs(functions) do
        for _, key in ipairs(c_built_keys(file, fn)) do
          n = n + 1
          if not fields[key] then missing[#missing + 1] = class .. "." .. key .. " (" .. fn .. ")" end
        end
      end
      assert.is_true(n >= (entry[4] or 6), "found only " .. n .. " keys set by " .. table.concat(functions, ", "))
    end
    table.sort(missing)
    assert.same({}, missing)
  end)

  it("has in rpc.ErrorKind every kind the C sources return", function()
    local kinds, alias, missing, n = kinds_in_c(), alias_kinds(), {}, 0
    for kind, file in pairs(kinds) do
      n = n + 1
      if not alias[kind] then missing[#missing + 1] = kind .. " (" .. file .. ")" end
    end
    table.sort(missing)
    -- the grep must find the kinds of every mechanism, or it checks nothing
    for _, kind in ipairs {"timeout", "no_route", "remote", "connection", "auth", "broker", "blocked",
                           "tls", "too_large", "closed", "stale", "interrupted"} do
      assert.is_truthy(kinds[kind], "the grep of csrc/*.c no longer finds kind '" .. kind .. "'")
    end
    assert.same({}, missing)
  end)

  it("has in rpc.ErrorKind every kind of README's Error kinds table", function()
    local alias, missing = alias_kinds(), {}
    local listed = readme_kinds()
    assert.is_true(#listed >= 12, "README's Error kinds table was not found whole")
    for _, kind in ipairs(listed) do
      if not alias[kind] then missing[#missing + 1] = kind end
    end
    assert.same({}, missing)
  end)

  it("would fail for a method added in C without an annotation", function()
    local decl = declarations(META)
    assert.same({"Client:frobnicate", "rpc.teleport"},
      undeclared(decl, {"Client:call", "Client:frobnicate", "rpc.client", "rpc.teleport", "rpc._VERSION"}))
  end)
end)
