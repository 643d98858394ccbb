/* Options tables: every key known, every value checked, before anything is acquired. */
#include <math.h>
#include <string.h>

#include "rpc.h"

/* The options table is always the last declared argument: its index is its argument number. */
void opts_check_keys(lua_State *L, int idx, const char *const allowed[]) {
  if (lua_isnoneornil(L, idx)) return;
  luaL_checktype(L, idx, LUA_TTABLE);
  lua_pushnil(L);
  while (lua_next(L, idx)) {
    lua_pop(L, 1);
    int known = 0;
    if (lua_type(L, -1) == LUA_TSTRING) {
      const char *key = lua_tostring(L, -1);
      for (int i = 0; allowed[i] && !known; i++) known = strcmp(key, allowed[i]) == 0;
      if (!known) luaL_argerror(L, idx, lua_pushfstring(L, "unknown option '%s'", key));
    } else {
      luaL_argerror(L, idx, lua_pushfstring(L, "option keys must be strings, got %s",
                                            luaL_typename(L, -1)));
    }
  }
}

/* Pushes opts[key], read raw: an options table's metamethods are never run (nil when there is
 * no table). Returns its type. Anything else at idx is a bad argument, never read: lua_rawget
 * on a non-table is undefined behaviour (a crash), whatever a caller checked or not before. */
int opts_get(lua_State *L, int idx, const char *key) {
  if (lua_isnoneornil(L, idx)) {
    lua_pushnil(L);
    return LUA_TNIL;
  }
  luaL_checktype(L, idx, LUA_TTABLE);
  lua_pushstring(L, key);
  return lua_rawget(L, idx);
}

static int get_option(lua_State *L, int idx, const char *key) {
  return opts_get(L, idx, key) != LUA_TNIL;
}

static int option_error(lua_State *L, int idx, const char *key, const char *expected) {
  return luaL_argerror(L, idx, lua_pushfstring(L, "option '%s' must be %s, got %s", key, expected,
                                               luaL_typename(L, -1)));
}

const char *opts_string(lua_State *L, int idx, const char *key, const char *def, size_t *len) {
  const char *s = def;
  if (len) *len = def ? strlen(def) : 0;
  if (get_option(L, idx, key)) {
    if (lua_type(L, -1) != LUA_TSTRING) option_error(L, idx, key, "a string");
    s = lua_tolstring(L, -1, len);  /* stays alive: the table holds it */
  }
  lua_pop(L, 1);
  return s;
}

double opts_number(lua_State *L, int idx, const char *key, double def, double min, double max) {
  double v = def;
  if (get_option(L, idx, key)) {
    if (lua_type(L, -1) != LUA_TNUMBER) option_error(L, idx, key, "a number");
    v = lua_tonumber(L, -1);
    if (!(v >= min && v <= max))
      luaL_argerror(L, idx, lua_pushfstring(L, "option '%s' must be between %f and %f", key,
                                            min, max));
  }
  lua_pop(L, 1);
  return v;
}

lua_Integer opts_integer(lua_State *L, int idx, const char *key, lua_Integer def, lua_Integer min,
                         lua_Integer max) {
  lua_Integer v = def;
  if (get_option(L, idx, key)) {
    int isint = 0;
    v = lua_tointegerx(L, -1, &isint);
    if (!isint || lua_type(L, -1) != LUA_TNUMBER) option_error(L, idx, key, "an integer");
    if (v < min || v > max)
      luaL_argerror(L, idx, lua_pushfstring(L, "option '%s' must be between %I and %I", key,
                                            min, max));
  }
  lua_pop(L, 1);
  return v;
}

int opts_boolean(lua_State *L, int idx, const char *key, int def) {
  int v = def;
  if (get_option(L, idx, key)) {
    if (lua_type(L, -1) != LUA_TBOOLEAN) option_error(L, idx, key, "a boolean");
    v = lua_toboolean(L, -1);
  }
  lua_pop(L, 1);
  return v;
}

double opts_check_timeout(lua_State *L, int idx, double def) {
  if (lua_isnoneornil(L, idx)) return def;
  double t = luaL_checknumber(L, idx);
  luaL_argcheck(L, t > 0 && t <= RPC_MAX_TIMEOUT, idx,
                "timeout must be a positive number of seconds (at most 1e6)");
  return t;
}
