/* AMQP field tables <-> Lua tables (message headers, queue arguments). */
#include <math.h>
#include <string.h>

#include "rpc.h"

#define MAX_DEPTH 16       /* 0.11 decodes tables of any depth; we never recurse past this */
#define MAX_ENTRIES 1024   /* in all, nested ones included: what a request may make us build */
#define MAX_KEY 255      /* a field name is a shortstr */

static void value_from_lua(lua_State *L, amqp_field_value_t *v) {
  switch (lua_type(L, -1)) {
    case LUA_TSTRING: {
      size_t len;
      const char *s = lua_tolstring(L, -1, &len);
      v->kind = AMQP_FIELD_KIND_UTF8;  /* a longstr: any bytes */
      v->value.bytes.len = len;
      v->value.bytes.bytes = (void *)s;  /* the caller's table keeps it alive until publish */
      break;
    }
    case LUA_TNUMBER:
      if (lua_isinteger(L, -1)) {
        v->kind = AMQP_FIELD_KIND_I64;
        v->value.i64 = (int64_t)lua_tointeger(L, -1);
      } else {
        v->kind = AMQP_FIELD_KIND_F64;
        v->value.f64 = lua_tonumber(L, -1);
      }
      break;
    case LUA_TBOOLEAN:
      v->kind = AMQP_FIELD_KIND_BOOLEAN;
      v->value.boolean = lua_toboolean(L, -1);
      break;
    default:
      break;  /* check_entry let nothing else through */
  }
}

/* A bad entry: a bad argument argn; with argn 0 (a handler's reply headers, not an argument),
 * a plain error. */
static int table_error(lua_State *L, int argn, const char *message) {
  if (argn > 0) return luaL_argerror(L, argn, message);
  return luaL_error(L, "headers: %s", message);
}

/* Raises a bad argument naming argn unless the entry on top of the stack (key at -2) is a
 * string key up to 255 bytes with a string, number or boolean value. Returns its encoded size. */
static size_t check_entry(lua_State *L, int argn) {
  if (lua_type(L, -2) != LUA_TSTRING)
    table_error(L, argn, lua_pushfstring(L, "table keys must be strings, got %s",
                                           luaL_typename(L, -2)));
  if (lua_rawlen(L, -2) > MAX_KEY) table_error(L, argn, "table key longer than 255 bytes");
  int t = lua_type(L, -1);
  if (t != LUA_TSTRING && t != LUA_TNUMBER && t != LUA_TBOOLEAN)
    table_error(L, argn, lua_pushfstring(L, "entry '%s' must be a string, number or boolean, got %s",
                                           lua_tostring(L, -2), luaL_typename(L, -1)));
  if (t == LUA_TNUMBER && !lua_isinteger(L, -1) && !isfinite(lua_tonumber(L, -1)))  /* RabbitMQ: 541 */
    table_error(L, argn, lua_pushfstring(L, "entry '%s' must be a finite number", lua_tostring(L, -2)));
  size_t value = t == LUA_TSTRING ? 4 + lua_rawlen(L, -1) : t == LUA_TNUMBER ? 8 : 1;
  return 1 + lua_rawlen(L, -2) + 1 + value;  /* key length, key, kind, value */
}

/* Converts the flat table at idx (string keys; string, number or boolean values) into out,
 * allocating from pool; with no pool it only checks. Every entry is checked before anything
 * is allocated, so a bad one raises (naming argument argn, or plainly with argn 0) with nothing
 * to undo. The strings
 * are borrowed: the table must outlive out. */
void table_from_lua(lua_State *L, int idx, int argn, amqp_pool_t *pool, amqp_table_t *out) {
  int n = 0;
  size_t size = 4;
  lua_pushnil(L);
  while (lua_next(L, idx)) {
    size += check_entry(L, argn);
    lua_pop(L, 1);
    n++;
  }
  /* it must fit one header frame with the other properties: a failed encoding after the
   * method frame went out would cost the whole connection */
  if (size > RPC_MAX_TABLE)
    table_error(L, argn, lua_pushfstring(L, "table too large: %I bytes encoded, at most %d",
                                           (lua_Integer)size, RPC_MAX_TABLE));
  if (!pool) return;
  out->num_entries = 0;
  out->entries = n ? amqp_pool_alloc(pool, sizeof(amqp_table_entry_t) * (size_t)n) : NULL;
  if (n && !out->entries) luaL_error(L, "not enough memory");
  lua_pushnil(L);
  while (lua_next(L, idx)) {
    amqp_table_entry_t *e = &out->entries[out->num_entries++];
    size_t klen;
    e->key.bytes = (void *)lua_tolstring(L, -2, &klen);
    e->key.len = klen;
    value_from_lua(L, &e->value);
    lua_pop(L, 1);
  }
}

static int value_fits(const amqp_field_value_t *v, int depth, size_t *entries);

/* Counts entries down to MAX_DEPTH, never deeper: 0 once a cap is passed. */
static int table_fits(const amqp_table_t *t, int depth, size_t *entries) {
  if (depth > MAX_DEPTH || (*entries += (size_t)t->num_entries) > MAX_ENTRIES) return 0;
  for (int i = 0; i < t->num_entries; i++)
    if (!value_fits(&t->entries[i].value, depth, entries)) return 0;
  return 1;
}

static int value_fits(const amqp_field_value_t *v, int depth, size_t *entries) {
  if (v->kind == AMQP_FIELD_KIND_TABLE) return table_fits(&v->value.table, depth + 1, entries);
  if (v->kind != AMQP_FIELD_KIND_ARRAY) return 1;
  const amqp_array_t *a = &v->value.array;
  if (depth + 1 > MAX_DEPTH || (*entries += (size_t)a->num_entries) > MAX_ENTRIES) return 0;
  for (int i = 0; i < a->num_entries; i++)
    if (!value_fits(&a->entries[i], depth + 1, entries)) return 0;
  return 1;
}

static void push_value(lua_State *L, const amqp_field_value_t *v);

static void push_array(lua_State *L, const amqp_array_t *a) {
  lua_createtable(L, a->num_entries, 0);
  for (int i = 0; i < a->num_entries; i++) {
    push_value(L, &a->entries[i]);
    lua_rawseti(L, -2, i + 1);
  }
}

static void push_table(lua_State *L, const amqp_table_t *t) {
  lua_createtable(L, 0, t->num_entries);
  for (int i = 0; i < t->num_entries; i++) {
    const amqp_table_entry_t *e = &t->entries[i];
    lua_pushlstring(L, e->key.bytes, e->key.len);
    push_value(L, &e->value);
    lua_rawset(L, -3);
  }
}

/* Only called on values table_fits has bounded. */
static void push_value(lua_State *L, const amqp_field_value_t *v) {
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
    case AMQP_FIELD_KIND_ARRAY: push_array(L, &v->value.array); break;
    case AMQP_FIELD_KIND_TABLE: push_table(L, &v->value.table); break;
    default: lua_pushboolean(L, 0); break;  /* void and unknown kinds */
  }
}

/* Pushes t as a Lua table and returns 1; returns 0, pushing nothing, when t is deeper than
 * MAX_DEPTH or has more than MAX_ENTRIES entries: a request cannot make us build more. */
int table_push(lua_State *L, const amqp_table_t *t) {
  size_t entries = 0;
  if (!table_fits(t, 1, &entries)) return 0;
  push_table(L, t);
  return 1;
}
