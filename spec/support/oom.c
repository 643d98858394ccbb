/* oom: a test-only Lua module that makes chosen allocations of its Lua state fail, so specs can
 * reach the "not enough memory" paths of rpc.core deterministically (spec/raise_spec.lua).
 *
 *   local oom = require "oom"       -- build/test/oom.so (make test builds it)
 *   oom.fail_size(n [, count])      -- allocations of exactly n bytes fail
 *   oom.fail_range(lo, hi [, count])-- allocations of lo to hi bytes fail
 *   n = oom.failures()              -- allocations failed since armed
 *   n = oom.off()                   -- disarms, restores the original allocator; the failures
 *
 * "Allocations" are new blocks and growths (lua_Alloc with ptr NULL, or nsize > osize); frees
 * and shrinks always succeed, as Lua requires. count bounds the failures (default: every
 * matching allocation until off()). Note that Lua answers a failed allocation with an
 * emergency collection and one retry: a count of 1 lets the retry succeed.
 *
 * The state of the wrapper is the allocator's own user data (malloc'd): the module keeps no
 * static state, and a state closed while armed still frees through a valid wrapper. */
#include <stdlib.h>

#include <lauxlib.h>
#include <lua.h>

struct oom {
  lua_Alloc f;        /* the allocator wrapped */
  void *ud;
  size_t lo, hi;      /* sizes that fail */
  lua_Integer left;   /* failures still to cause; negative: no bound */
  lua_Integer failures;
};

static void *oom_alloc(void *ud, void *ptr, size_t osize, size_t nsize) {
  struct oom *o = ud;
  if (nsize >= o->lo && nsize <= o->hi && (ptr == NULL || nsize > osize) && o->left != 0) {
    if (o->left > 0) o->left--;
    o->failures++;
    return NULL;
  }
  return o->f(o->ud, ptr, osize, nsize);
}

/* The wrapper's state if it is installed, else NULL. */
static struct oom *installed(lua_State *L) {
  void *ud;
  lua_Alloc f = lua_getallocf(L, &ud);
  return f == oom_alloc ? ud : NULL;
}

static int arm(lua_State *L, lua_Integer lo, lua_Integer hi, int count_arg) {
  luaL_argcheck(L, lo >= 1, 1, "size must be at least 1");
  luaL_argcheck(L, hi >= lo, 2, "range must not be empty");
  lua_Integer count = luaL_optinteger(L, count_arg, -1);
  luaL_argcheck(L, count != 0, count_arg, "count must not be 0");
  struct oom *o = installed(L);
  if (!o) {
    o = malloc(sizeof *o);
    if (!o) return luaL_error(L, "oom: cannot allocate its state");
    o->f = lua_getallocf(L, &o->ud);
    lua_setallocf(L, oom_alloc, o);
  }
  o->lo = (size_t)lo;
  o->hi = (size_t)hi;
  o->left = count < 0 ? -1 : count;
  o->failures = 0;
  return 0;
}

static int oom_fail_size(lua_State *L) {
  lua_Integer n = luaL_checkinteger(L, 1);
  return arm(L, n, n, 2);
}

static int oom_fail_range(lua_State *L) {
  return arm(L, luaL_checkinteger(L, 1), luaL_checkinteger(L, 2), 3);
}

static int oom_failures(lua_State *L) {
  struct oom *o = installed(L);
  lua_pushinteger(L, o ? o->failures : 0);
  return 1;
}

static int oom_off(lua_State *L) {
  struct oom *o = installed(L);
  lua_Integer failures = o ? o->failures : 0;
  if (o) {
    lua_setallocf(L, o->f, o->ud);
    free(o);
  }
  lua_pushinteger(L, failures);
  return 1;
}

static const luaL_Reg oom_functions[] = {{"fail_size", oom_fail_size},
                                         {"fail_range", oom_fail_range},
                                         {"failures", oom_failures},
                                         {"off", oom_off},
                                         {NULL, NULL}};

LUAMOD_API int luaopen_oom(lua_State *L);

LUAMOD_API int luaopen_oom(lua_State *L) {
  luaL_newlib(L, oom_functions);
  return 1;
}
