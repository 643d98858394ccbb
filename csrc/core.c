/* luaopen_rpc_core: the module table, and the two helpers every concept shares. */
#define _POSIX_C_SOURCE 200809L
#include <time.h>

#include "rpc.h"

int rpc_fail(lua_State *L, const char *kind, const char *message) {
  lua_pushnil(L);
  lua_pushstring(L, message);
  lua_pushstring(L, kind);
  return 3;
}

double rpc_now(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

double rpc_wall_now(void) {
  struct timespec ts;
  clock_gettime(CLOCK_REALTIME, &ts);
  return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

/* rpc.now(): the same clock, for callers timing things without another library. */
static int core_now(lua_State *L) {
  lua_pushnumber(L, rpc_now());
  return 1;
}

/* rpc.remaining(): seconds left before the deadline of the request whose handler runs this
 * (0 once past), or nil: not in a handler, or the request has no deadline. */
static int core_remaining(lua_State *L) {
  const struct rpc_context *ctx = loop_context(loop_get(L));
  if (!ctx || ctx->deadline_wall <= 0) {
    lua_pushnil(L);
    return 1;
  }
  double left = ctx->deadline - rpc_now();
  lua_pushnumber(L, left > 0 ? left : 0);
  return 1;
}

/* A metatable with its metamethods, and the methods as its __index (liolib's createmeta). */
void rpc_new_type(lua_State *L, const char *name, const luaL_Reg *meta, const luaL_Reg *methods) {
  luaL_newmetatable(L, name);
  luaL_setfuncs(L, meta, 0);
  lua_newtable(L);
  luaL_setfuncs(L, methods, 0);
  lua_setfield(L, -2, "__index");
  lua_pop(L, 1);
}

void rpc_set_count(lua_State *L, const char *name, lua_Integer n) {
  lua_pushinteger(L, n);
  lua_setfield(L, -2, name);
}

int luaopen_rpc_core(lua_State *L) {
  lua_newtable(L);
  rpc_client_open(L);
  rpc_server_open(L);
  rpc_messaging_open(L);
  rpc_loop_open(L);
  lua_pushcfunction(L, core_now);
  lua_setfield(L, -2, "now");
  lua_pushcfunction(L, core_remaining);
  lua_setfield(L, -2, "remaining");
  lua_pushliteral(L, "rabbitrpc " RPC_VERSION);
  lua_setfield(L, -2, "_VERSION");
  return 1;
}
