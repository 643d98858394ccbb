/* AMQP field tables <-> Lua tables (message headers, queue arguments). */
#include <math.h>
#include <string.h>

#include "rpc.h"

#define MAX_DEPTH 16     /* 0.11 decodes tables of any depth; we never recurse past this */
#define MAX_KEY 255      /* a field name is a shortstr */

static int value_from_lua(lua_State *L, amqp_field_value_t *v) {
  switch (lua_type(L, -1)) {
    case LUA_TSTRING: {
      size_t len;
      const char *s = lua_tolstring(L, -1, &len);
      v->kind = AMQP_FIELD_KIND_UTF8;  /* a longstr: any bytes */
      v->value.bytes.len = len;
      v->value.bytes.bytes = (void *)s;  /* the caller's table keeps it alive until publish */
      return 1;
    }
    case LUA_TNUMBER:
      if (lua_isinteger(L, -1)) {
        v->kind = AMQP_FIELD_KIND_I64;
        v->value.i64 = (int64_t)lua_tointeger(L, -1);
      } else {
        v->kind = AMQP_FIELD_KIND_F64;
        v->value.f64 = lua_tonumber(L, -1);
      }
      return 1;
    case LUA_TBOOLEAN:
      v->kind = AMQP_FIELD_KIND_BOOLEAN;
      v->value.boolean = lua_toboolean(L, -1);
      return 1;
    default:
      return 0;
  }
}

/* Converts the flat table at idx (string keys; string, number or boolean values) into out,
 * allocating from pool. Raises a bad argument naming argn on anything else. */
void table_from_lua(lua_State *L, int idx, int argn, amqp_pool_t *pool, amqp_table_t *out) {
  int n = 0;
  lua_pushnil(L);
  while (lua_next(L, idx)) {
    lua_pop(L, 1);
    n++;
  }
  out->num_entries = 0;
  out->entries = n ? amqp_pool_alloc(pool, sizeof(amqp_table_entry_t) * (size_t)n) : NULL;
  if (n && !out->entries) luaL_error(L, "not enough memory");
  lua_pushnil(L);
  while (lua_next(L, idx)) {
    if (lua_type(L, -2) != LUA_TSTRING)
      luaL_argerror(L, argn, lua_pushfstring(L, "header keys must be strings, got %s",
                                             luaL_typename(L, -2)));
    size_t klen;
    const char *key = lua_tolstring(L, -2, &klen);
    if (klen > MAX_KEY) luaL_argerror(L, argn, "header key longer than 255 bytes");
    amqp_table_entry_t *e = &out->entries[out->num_entries];
    if (!value_from_lua(L, &e->value))
      luaL_argerror(L, argn, lua_pushfstring(L, "header '%s' must be a string, number or boolean, got %s",
                                             key, luaL_typename(L, -1)));
    e->key.len = klen;
    e->key.bytes = (void *)key;
    out->num_entries++;
    lua_pop(L, 1);
  }
}

static void push_value(lua_State *L, const amqp_field_value_t *v, int depth);

static void push_array(lua_State *L, const amqp_array_t *a, int depth) {
  lua_createtable(L, a->num_entries, 0);
  for (int i = 0; i < a->num_entries; i++) {
    push_value(L, &a->entries[i], depth + 1);
    lua_rawseti(L, -2, i + 1);
  }
}

static void push_table(lua_State *L, const amqp_table_t *t, int depth) {
  lua_createtable(L, 0, t->num_entries);
  for (int i = 0; i < t->num_entries; i++) {
    const amqp_table_entry_t *e = &t->entries[i];
    lua_pushlstring(L, e->key.bytes, e->key.len);
    push_value(L, &e->value, depth + 1);
    lua_rawset(L, -3);
  }
}

static void push_value(lua_State *L, const amqp_field_value_t *v, int depth) {
  luaL_checkstack(L, 4, "header table");
  switch (v->kind) {
    case AMQP_FIELD_KIND_BOOLEAN: lua_pushboolean(L, v->value.boolean); break;
    case AMQP_FIELD_KIND_I8: lua_pushinteger(L, v->value.i8); break;
    case AMQP_FIELD_KIND_U8: lua_pushinteger(L, v->value.u8); break;
    case AMQP_FIELD_KIND_I16: lua_pushinteger(L, v->value.i16); break;
    case AMQP_FIELD_KIND_U16: lua_pushinteger(L, v->value.u16); break;
    case AMQP_FIELD_KIND_I32: lua_pushinteger(L, v->value.i32); break;
    case AMQP_FIELD_KIND_U32: lua_pushinteger(L, (lua_Integer)v->value.u32); break;
    case AMQP_FIELD_KIND_I64: lua_pushinteger(L, (lua_Integer)v->value.i64); break;
    case AMQP_FIELD_KIND_TIMESTAMP:
    case AMQP_FIELD_KIND_U64:
      if (v->value.u64 <= (uint64_t)LUA_MAXINTEGER) lua_pushinteger(L, (lua_Integer)v->value.u64);
      else lua_pushnumber(L, (lua_Number)v->value.u64);
      break;
    case AMQP_FIELD_KIND_F32: lua_pushnumber(L, v->value.f32); break;
    case AMQP_FIELD_KIND_F64: lua_pushnumber(L, v->value.f64); break;
    case AMQP_FIELD_KIND_DECIMAL:
      lua_pushnumber(L, v->value.decimal.value / pow(10, v->value.decimal.decimals));
      break;
    case AMQP_FIELD_KIND_UTF8:
    case AMQP_FIELD_KIND_BYTES:
      lua_pushlstring(L, v->value.bytes.bytes, v->value.bytes.len);
      break;
    case AMQP_FIELD_KIND_ARRAY:
      if (depth < MAX_DEPTH) push_array(L, &v->value.array, depth);
      else lua_pushboolean(L, 0);  /* too deep to convert: a placeholder, never a crash */
      break;
    case AMQP_FIELD_KIND_TABLE:
      if (depth < MAX_DEPTH) push_table(L, &v->value.table, depth);
      else lua_pushboolean(L, 0);
      break;
    default: lua_pushboolean(L, 0); break;  /* void and unknown kinds */
  }
}

void table_push(lua_State *L, const amqp_table_t *t) {
  push_table(L, t, 0);
}
