/* Bodies and properties: opts.codec (a body as any Lua value, encoded on the way out and
 * decoded on the way in), a handler's reply properties and a caller's properties = true.
 * Codec functions are user code: every call to them is protected, and its failure is a value
 * (a message) for the caller to turn into a bad argument, an error reply or a "codec" kind. */
#include <string.h>

#include "rpc.h"

enum { CODEC_ENCODE = 1, CODEC_DECODE = 2 };  /* slots of the private table the owner keeps */

static const char *const codec_keys[] = {"encode", "decode", "content_type", NULL};

/* lua-cjson's encode and decode, into the private table on top. Returns 0, or pushes its
 * failure (nil, message, "codec") and returns 3: a missing library is a runtime failure of the
 * installation, not the caller's programming error. */
static int load_json(lua_State *L, struct rpc_codec *codec) {
  static const char missing[] = "opts.codec 'json' needs lua-cjson (Debian: lua-cjson)";
  int table = lua_gettop(L);
  int ok = lua_getglobal(L, "require") == LUA_TFUNCTION;
  if (ok) {
    lua_pushliteral(L, "cjson");
    ok = lua_pcall(L, 1, 1, 0) == LUA_OK && lua_istable(L, -1);
  }
  if (ok) {
    ok = lua_getfield(L, -1, "encode") == LUA_TFUNCTION && lua_getfield(L, -2, "decode") == LUA_TFUNCTION;
  }
  if (!ok) {
    const char *why = lua_type(L, table + 1) == LUA_TSTRING ? lua_tostring(L, table + 1) : "";
    int not_found = strncmp(why, "module 'cjson' not found", 24) == 0 || !*why;
    const char *message = not_found ? missing : lua_pushfstring(L, "%s: %s", missing, why);
    lua_pushnil(L);
    lua_pushstring(L, message);
    lua_pushliteral(L, "codec");
    return 3;
  }
  lua_rawseti(L, table, CODEC_DECODE);
  lua_rawseti(L, table, CODEC_ENCODE);
  lua_settop(L, table);
  codec->name = "json";
  memcpy(codec->content_type, "application/json", 17);
  codec->content_type_len = 16;
  return 0;
}

/* A codec table {encode = f, decode = f [, content_type = s]} at value, read raw, into the
 * private table on top: later changes to the user's table do not count. */
static void copy_table_codec(lua_State *L, int opts, int value, struct rpc_codec *codec) {
  lua_pushnil(L);
  while (lua_next(L, value)) {
    lua_pop(L, 1);
    int known = 0;
    if (lua_type(L, -1) == LUA_TSTRING)
      for (int i = 0; codec_keys[i] && !known; i++) known = strcmp(lua_tostring(L, -1), codec_keys[i]) == 0;
    if (!known)
      luaL_argerror(L, opts, lua_type(L, -1) == LUA_TSTRING
                                 ? lua_pushfstring(L, "unknown option 'codec.%s'", lua_tostring(L, -1))
                                 : lua_pushfstring(L, "option keys of 'codec' must be strings, got %s",
                                                   luaL_typename(L, -1)));
  }
  for (int slot = CODEC_ENCODE; slot <= CODEC_DECODE; slot++) {
    const char *key = codec_keys[slot - 1];
    lua_pushstring(L, key);
    if (lua_rawget(L, value) != LUA_TFUNCTION)
      luaL_argerror(L, opts, lua_pushfstring(L, "option 'codec.%s' must be a function, got %s", key,
                                              luaL_typename(L, -1)));
    lua_rawseti(L, -2, slot);
  }
  lua_pushliteral(L, "content_type");
  int t = lua_rawget(L, value);
  size_t len = 0;
  if (t != LUA_TNIL && (t != LUA_TSTRING || (lua_tolstring(L, -1, &len), len > 255)))
    luaL_argerror(L, opts, "option 'codec.content_type' must be a string of at most 255 bytes");
  if (t == LUA_TSTRING) memcpy(codec->content_type, lua_tostring(L, -1), len);
  codec->content_type_len = len;
  lua_pop(L, 1);
  codec->name = "custom";
}

int rpc_codec_new(lua_State *L, int opts, struct rpc_codec *codec) {
  memset(codec, 0, sizeof *codec);
  int t = opts_get(L, opts, "codec");
  if (t == LUA_TNIL) return 0;
  int value = lua_gettop(L);
  if (t == LUA_TSTRING) {
    if (lua_rawlen(L, value) != 4 || strcmp(lua_tostring(L, value), "json") != 0)
      luaL_argerror(L, opts, lua_pushfstring(L, "option 'codec': unknown codec '%s' (\"json\", or a "
                                                 "table {encode = f, decode = f})", lua_tostring(L, value)));
  } else if (t != LUA_TTABLE) {
    luaL_argerror(L, opts, lua_pushfstring(L, "option 'codec' must be \"json\" or a table {encode = "
                                               "function, decode = function [, content_type = string]}, got %s",
                                            luaL_typename(L, value)));
  }
  lua_createtable(L, 2, 0);
  if (t == LUA_TSTRING) {
    if (load_json(L, codec)) return 3;  /* nil, message, kind on top: the caller returns them */
  } else {
    copy_table_codec(L, opts, value, codec);
  }
  lua_replace(L, value);
  codec->on = 1;
  return 0;
}

/* Calls the codec's function slot on the value at idx, protected. Pushes its result and
 * returns 1; or pushes "cannot <what> (codec name): why" and returns 0. */
static int transform(lua_State *L, const struct rpc_codec *codec, int owner, int uv, int idx, int slot,
                     const char *what) {
  int base = lua_gettop(L);
  idx = lua_absindex(L, idx);
  lua_getiuservalue(L, owner, uv);
  lua_rawgeti(L, -1, slot);
  lua_remove(L, -2);
  lua_pushvalue(L, idx);
  const char *why;
  if (lua_pcall(L, 1, 1, 0) == LUA_OK) {
    int t = lua_type(L, -1);
    if (slot == CODEC_ENCODE ? t == LUA_TSTRING : t != LUA_TNIL) return 1;
    why = slot == CODEC_ENCODE ? lua_pushfstring(L, "encode returned %s (a string expected)", luaL_typename(L, -1))
                               : "decode returned nil";
  } else {
    int t = lua_type(L, -1);
    why = t == LUA_TSTRING || t == LUA_TNUMBER
              ? lua_tostring(L, -1)
              : lua_pushfstring(L, "(error object is a %s value)", luaL_typename(L, -1));
  }
  lua_pushfstring(L, "cannot %s (codec %s): %s", what, codec->name, why);
  lua_replace(L, base + 1);
  lua_settop(L, base + 1);
  return 0;
}

int rpc_codec_encode(lua_State *L, const struct rpc_codec *codec, int owner, int uv, int idx, const char *what) {
  return transform(L, codec, lua_absindex(L, owner), uv, idx, CODEC_ENCODE, what);
}

int rpc_codec_decode(lua_State *L, const struct rpc_codec *codec, int owner, int uv, int idx, const char *what) {
  return transform(L, codec, lua_absindex(L, owner), uv, idx, CODEC_DECODE, what);
}

/* ---- reply properties ---- */

static void set_bytes(lua_State *L, const char *name, amqp_bytes_t b) {
  lua_pushlstring(L, b.bytes, b.len);
  lua_setfield(L, -2, name);
}

/* build_properties(p): the table, with no finalizer able to run (see below). */
static int build_properties(lua_State *L) {
  const amqp_basic_properties_t *p = lua_touserdata(L, 1);
  lua_createtable(L, 0, 2);
  if (p && (p->_flags & AMQP_BASIC_CONTENT_TYPE_FLAG)) set_bytes(L, "content_type", p->content_type);
  if (p && (p->_flags & AMQP_BASIC_HEADERS_FLAG)) {
    if (table_push(L, &p->headers)) {
      lua_setfield(L, -2, "headers");
    } else {  /* over the caps a request's headers have: as rpc.connect's messages say it */
      lua_pushboolean(L, 1);
      lua_setfield(L, -2, "headers_too_large");
    }
  }
  return 1;
}

/* p points into the message in hand, which a finalizer closing its client would free: the
 * collector is stopped while the table is built (only an emergency collection can run then,
 * and it calls no finalizer), and restarted on every path, a raise included. */
void rpc_codec_push_properties(lua_State *L, const amqp_basic_properties_t *p) {
  int running = lua_gc(L, LUA_GCISRUNNING);
  lua_gc(L, LUA_GCSTOP);
  lua_pushcfunction(L, build_properties);
  lua_pushlightuserdata(L, (void *)p);
  int status = lua_pcall(L, 1, 1, 0);
  if (running) lua_gc(L, LUA_GCRESTART);
  if (status != LUA_OK) lua_error(L);
}

/* convert_properties(props, pool, out): see rpc_codec_reply_properties; raises on a bad one. */
static int convert_properties(lua_State *L) {
  amqp_pool_t *pool = lua_touserdata(L, 2);
  amqp_basic_properties_t *out = lua_touserdata(L, 3);
  luaL_checktype(L, 1, LUA_TTABLE);  /* the caller passes only tables: anything else is no properties */
  lua_settop(L, 1);
  lua_pushnil(L);
  while (lua_next(L, 1)) {
    lua_pop(L, 1);
    if (lua_type(L, -1) != LUA_TSTRING)  /* named by its type: a key's __tostring is not run */
      return luaL_error(L, "unknown key of type %s (content_type and headers are allowed)", luaL_typename(L, -1));
    if (strcmp(lua_tostring(L, -1), "content_type") != 0 && strcmp(lua_tostring(L, -1), "headers") != 0)
      return luaL_error(L, "unknown key '%s' (content_type and headers are allowed)", lua_tostring(L, -1));
  }
  lua_createtable(L, 0, 2);  /* 2: the copy the converted properties point into */
  size_t len;
  int t = (lua_pushliteral(L, "content_type"), lua_rawget(L, 1));
  if (t != LUA_TNIL && (t != LUA_TSTRING || (lua_tolstring(L, -1, &len), len > 255)))
    return luaL_error(L, "content_type must be a string of at most 255 bytes");
  if (t == LUA_TSTRING) {
    out->content_type.bytes = (void *)lua_tolstring(L, -1, &out->content_type.len);
    out->_flags |= AMQP_BASIC_CONTENT_TYPE_FLAG;
    lua_setfield(L, 2, "content_type");
  } else {
    lua_pop(L, 1);
  }
  t = (lua_pushliteral(L, "headers"), lua_rawget(L, 1));
  if (t != LUA_TNIL && t != LUA_TTABLE) return luaL_error(L, "headers must be a table, got %s", luaL_typename(L, -1));
  if (t == LUA_TTABLE) {
    lua_newtable(L);  /* 4: the headers' copy, read raw: nothing can change it before the publish */
    lua_pushnil(L);
    while (lua_next(L, 3)) {
      lua_pushvalue(L, -2);
      lua_insert(L, -2);
      lua_rawset(L, 4);
    }
    for (int i = 0; i < 2; i++)  /* an error reply's own: a reply with them would read as one */
      if (lua_getfield(L, 4, i ? RPC_ERROR_KIND_HEADER : RPC_ERROR_HEADER) != LUA_TNIL)
        return luaL_error(L, "headers: '%s' is reserved for error replies",
                          i ? RPC_ERROR_KIND_HEADER : RPC_ERROR_HEADER);
    lua_settop(L, 4);
    table_from_lua(L, 4, 0, pool, &out->headers);
    out->_flags |= AMQP_BASIC_HEADERS_FLAG;
    lua_setfield(L, 2, "headers");
  }
  lua_settop(L, 2);
  return 1;
}

int rpc_codec_reply_properties(lua_State *L, int idx, amqp_pool_t *pool, amqp_basic_properties_t *out) {
  idx = lua_absindex(L, idx);
  lua_pushcfunction(L, convert_properties);
  lua_pushvalue(L, idx);
  lua_pushlightuserdata(L, pool);
  lua_pushlightuserdata(L, out);
  if (lua_pcall(L, 3, 1, 0) == LUA_OK) return 1;
  out->_flags &= ~(amqp_flags_t)(AMQP_BASIC_CONTENT_TYPE_FLAG | AMQP_BASIC_HEADERS_FLAG);
  const char *why = lua_type(L, -1) == LUA_TSTRING ? lua_tostring(L, -1) : "not enough memory";
  lua_pushfstring(L, "handler returned bad reply properties: %s", why);
  lua_remove(L, -2);
  return 0;
}
