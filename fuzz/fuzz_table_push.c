/* libFuzzer target: table_push (csrc/table.c), AMQP field tables to Lua, in a real lua_State.
 *
 * The first byte picks where the table comes from:
 *   0  the rest is a field table on the wire, decoded by rabbitmq-c's amqp_decode_table (what a
 *      header frame's headers go through);
 *   1  the rest is a basic.properties payload, decoded by amqp_decode_properties, and its
 *      headers (if flagged) are converted, as server.c does for a handler's request table;
 *   2  the rest describes a table built directly, nested up to 200 deep, with any kind byte
 *      (also ones no decoder produces) and containers of up to 1100 entries.
 * table_push runs under lua_pcall. It must refuse (return 0, push nothing) exactly the tables
 * over the caps of the issue-5 contract, as a reference count here sees them: more than
 * MAX_DEPTH levels of tables and arrays (the headers table is level 1), or more than
 * MAX_ENTRIES entries in all. Every value of a table it converts is compared with its source:
 * integers stay integers, byte strings stay byte-exact, void and unknown kinds become false,
 * duplicate keys keep their last value, and the stack is left one table higher. */
#include <math.h>
#include <stdint.h>
#include <string.h>

#include <lualib.h>

#include "../csrc/rpc.h"
#include "fuzz.h"

#define MAX_DEPTH 16      /* the contract's caps: levels of nesting, entries in all */
#define MAX_ENTRIES 1024
#define BUILD_DEPTH 200
#define BUILD_NODES 5000

static lua_State *L;
static amqp_pool_t pool;

/* ---- building a table from the input (mode 2) ---- */

static const char kinds[] = "tbBsuIilLfdDSxATFV";

static void build_value(struct fuzz_input *in, amqp_field_value_t *v, int depth, int *nodes);

static int build_count(struct fuzz_input *in, int depth, int *nodes) {
  uint8_t b = fuzz_byte(in);
  int n = b >= 250 ? fuzz_u16(in) % 1101 : b % 6;  /* up to past MAX_ENTRIES */
  if (depth >= BUILD_DEPTH) n = 0;
  if (n > BUILD_NODES - *nodes) n = BUILD_NODES - *nodes;
  if (n < 0) n = 0;
  *nodes += n;
  return n;
}

static void build_bytes(struct fuzz_input *in, amqp_bytes_t *b, size_t max) {
  size_t len;
  b->bytes = (void *)fuzz_bytes(in, fuzz_byte(in) % (max + 1), &len);
  b->len = len;
}

static void build_value(struct fuzz_input *in, amqp_field_value_t *v, int depth, int *nodes) {
  uint8_t b = fuzz_byte(in);
  v->kind = b < 18 * 13 ? (uint8_t)kinds[b % 18] : fuzz_byte(in);  /* sometimes no known kind */
  switch (v->kind) {
    case AMQP_FIELD_KIND_BOOLEAN: v->value.boolean = fuzz_byte(in); break;
    case AMQP_FIELD_KIND_I8: v->value.i8 = (int8_t)fuzz_byte(in); break;
    case AMQP_FIELD_KIND_U8: v->value.u8 = fuzz_byte(in); break;
    case AMQP_FIELD_KIND_I16: v->value.i16 = (int16_t)fuzz_u16(in); break;
    case AMQP_FIELD_KIND_U16: v->value.u16 = fuzz_u16(in); break;
    case AMQP_FIELD_KIND_I32: v->value.i32 = (int32_t)(uint32_t)fuzz_u64(in); break;
    case AMQP_FIELD_KIND_U32: v->value.u32 = (uint32_t)fuzz_u64(in); break;
    case AMQP_FIELD_KIND_I64: v->value.i64 = (int64_t)fuzz_u64(in); break;
    case AMQP_FIELD_KIND_U64:
    case AMQP_FIELD_KIND_TIMESTAMP: v->value.u64 = fuzz_u64(in); break;
    case AMQP_FIELD_KIND_F32: {
      uint32_t bits = (uint32_t)fuzz_u64(in);
      memcpy(&v->value.f32, &bits, sizeof bits);
      break;
    }
    case AMQP_FIELD_KIND_F64: {
      uint64_t bits = fuzz_u64(in);
      memcpy(&v->value.f64, &bits, sizeof bits);
      break;
    }
    case AMQP_FIELD_KIND_DECIMAL:
      v->value.decimal.decimals = fuzz_byte(in);
      v->value.decimal.value = (uint32_t)fuzz_u64(in);
      break;
    case AMQP_FIELD_KIND_UTF8:
    case AMQP_FIELD_KIND_BYTES: build_bytes(in, &v->value.bytes, 255); break;
    case AMQP_FIELD_KIND_ARRAY: {
      int n = build_count(in, depth, nodes);
      v->value.array.num_entries = n;
      v->value.array.entries = n ? amqp_pool_alloc(&pool, sizeof(amqp_field_value_t) * (size_t)n) : NULL;
      FUZZ_CHECK(!n || v->value.array.entries, "out of memory");
      for (int i = 0; i < n; i++) build_value(in, &v->value.array.entries[i], depth + 1, nodes);
      break;
    }
    case AMQP_FIELD_KIND_TABLE: {
      amqp_table_t *t = &v->value.table;
      int n = build_count(in, depth, nodes);
      t->num_entries = n;
      t->entries = n ? amqp_pool_alloc(&pool, sizeof(amqp_table_entry_t) * (size_t)n) : NULL;
      FUZZ_CHECK(!n || t->entries, "out of memory");
      for (int i = 0; i < n; i++) {
        build_bytes(in, &t->entries[i].key, 7);  /* short keys: duplicates happen */
        build_value(in, &t->entries[i].value, depth + 1, nodes);
      }
      break;
    }
    default: memset(&v->value, 0, sizeof v->value); break;  /* void, or an unknown kind */
  }
}

/* ---- checking what table_push made ---- */

static void verify_table(int idx, const amqp_table_t *t);

static int same_number(lua_Number a, lua_Number b) {
  return a == b || (isnan(a) && isnan(b));
}

/* The value on top of the stack against v. */
static void verify_value(const amqp_field_value_t *v) {
  int top = lua_gettop(L);
  switch (v->kind) {
    case AMQP_FIELD_KIND_BOOLEAN:
      FUZZ_CHECK(lua_isboolean(L, -1) && lua_toboolean(L, -1) == (v->value.boolean != 0), "boolean");
      break;
#define INTEGER(field) \
      FUZZ_CHECK(lua_isinteger(L, -1) && lua_tointeger(L, -1) == (lua_Integer)v->value.field, "integer " #field)
    case AMQP_FIELD_KIND_I8: INTEGER(i8); break;
    case AMQP_FIELD_KIND_U8: INTEGER(u8); break;
    case AMQP_FIELD_KIND_I16: INTEGER(i16); break;
    case AMQP_FIELD_KIND_U16: INTEGER(u16); break;
    case AMQP_FIELD_KIND_I32: INTEGER(i32); break;
    case AMQP_FIELD_KIND_U32: INTEGER(u32); break;
    case AMQP_FIELD_KIND_I64: INTEGER(i64); break;
    case AMQP_FIELD_KIND_U64:
    case AMQP_FIELD_KIND_TIMESTAMP:
      if (v->value.u64 <= (uint64_t)LUA_MAXINTEGER) INTEGER(u64);
      else FUZZ_CHECK(lua_type(L, -1) == LUA_TNUMBER && !lua_isinteger(L, -1) &&
                      lua_tonumber(L, -1) == (lua_Number)v->value.u64, "u64 past maxinteger");
      break;
#undef INTEGER
    case AMQP_FIELD_KIND_F32:
      FUZZ_CHECK(lua_type(L, -1) == LUA_TNUMBER && !lua_isinteger(L, -1) &&
                 same_number(lua_tonumber(L, -1), v->value.f32), "f32");
      break;
    case AMQP_FIELD_KIND_F64:
      FUZZ_CHECK(lua_type(L, -1) == LUA_TNUMBER && !lua_isinteger(L, -1) &&
                 same_number(lua_tonumber(L, -1), v->value.f64), "f64");
      break;
    case AMQP_FIELD_KIND_DECIMAL: {
      lua_Number want = v->value.decimal.value / pow(10, v->value.decimal.decimals);
      FUZZ_CHECK(lua_type(L, -1) == LUA_TNUMBER && isfinite(lua_tonumber(L, -1)) &&
                 lua_tonumber(L, -1) == want, "decimal");
      break;
    }
    case AMQP_FIELD_KIND_UTF8:
    case AMQP_FIELD_KIND_BYTES: {
      size_t len;
      const char *s = lua_tolstring(L, -1, &len);
      FUZZ_CHECK(lua_type(L, -1) == LUA_TSTRING && len == v->value.bytes.len &&
                 (!len || memcmp(s, v->value.bytes.bytes, len) == 0), "byte string");
      break;
    }
    case AMQP_FIELD_KIND_ARRAY:
      FUZZ_CHECK(lua_istable(L, -1) && lua_getmetatable(L, -1) == 0, "array: not a plain table");
      FUZZ_CHECK(lua_rawlen(L, -1) == (lua_Unsigned)v->value.array.num_entries, "array length");
      for (int i = 0; i < v->value.array.num_entries; i++) {
        lua_rawgeti(L, top, i + 1);
        verify_value(&v->value.array.entries[i]);
        lua_pop(L, 1);
      }
      break;
    case AMQP_FIELD_KIND_TABLE:
      verify_table(top, &v->value.table);
      break;
    default:
      FUZZ_CHECK(lua_isboolean(L, -1) && !lua_toboolean(L, -1), "void or unknown kind: not false");
      break;
  }
  FUZZ_CHECK(lua_gettop(L) == top, "verify unbalanced");
}

/* The table at idx against t: one key per distinct entry key, holding the value of the last
 * entry with that key. */
static void verify_table(int idx, const amqp_table_t *t) {
  FUZZ_CHECK(lua_checkstack(L, 8), "no stack to verify");
  FUZZ_CHECK(lua_istable(L, idx) && lua_getmetatable(L, idx) == 0, "table: not a plain table");
  lua_createtable(L, 0, t->num_entries);  /* key -> index of its last entry */
  int last = lua_gettop(L);
  for (int i = 0; i < t->num_entries; i++) {
    lua_pushlstring(L, t->entries[i].key.bytes, t->entries[i].key.len);
    lua_pushinteger(L, i);
    lua_rawset(L, last);
  }
  lua_Integer distinct = 0;
  lua_pushnil(L);
  while (lua_next(L, last)) {
    const amqp_table_entry_t *e = &t->entries[lua_tointeger(L, -1)];
    lua_pop(L, 1);
    distinct++;
    lua_pushvalue(L, -1);
    lua_rawget(L, idx);
    verify_value(&e->value);
    lua_pop(L, 1);
  }
  lua_Integer n = 0;
  lua_pushnil(L);
  while (lua_next(L, idx)) {
    FUZZ_CHECK(lua_type(L, -2) == LUA_TSTRING, "a key that is not a string");
    lua_pop(L, 1);
    n++;
  }
  FUZZ_CHECK(n == distinct, "a key too many or too few");
  lua_pop(L, 1);
}

/* The reference caps: v at level (the headers table is level 1); the level of the deepest
 * table or array in v (0 for a scalar), and the entries in all. */
static int levels(const amqp_field_value_t *v, int level, size_t *entries) {
  int deepest = 0;
  if (v->kind == AMQP_FIELD_KIND_TABLE || v->kind == AMQP_FIELD_KIND_ARRAY) deepest = level;
  if (v->kind == AMQP_FIELD_KIND_TABLE) {
    *entries += (size_t)v->value.table.num_entries;
    for (int i = 0; i < v->value.table.num_entries; i++) {
      int d = levels(&v->value.table.entries[i].value, level + 1, entries);
      if (d > deepest) deepest = d;
    }
  } else if (v->kind == AMQP_FIELD_KIND_ARRAY) {
    *entries += (size_t)v->value.array.num_entries;
    for (int i = 0; i < v->value.array.num_entries; i++) {
      int d = levels(&v->value.array.entries[i], level + 1, entries);
      if (d > deepest) deepest = d;
    }
  }
  return deepest;
}

static int within_caps(const amqp_table_t *t) {
  amqp_field_value_t v;
  size_t entries = 0;
  v.kind = AMQP_FIELD_KIND_TABLE;
  v.value.table = *t;
  int deepest = levels(&v, 1, &entries);
  return deepest <= MAX_DEPTH && entries <= MAX_ENTRIES;
}

static int protected_push(lua_State *L1) {
  const amqp_table_t *t = lua_touserdata(L1, 1);
  int top = lua_gettop(L1);
  int pushed = table_push(L1, t);
  FUZZ_CHECK(pushed == within_caps(t), pushed ? "table_push converted a table over the caps"
                                              : "table_push refused a table within the caps");
  FUZZ_CHECK(lua_gettop(L1) == top + pushed, "table_push left the stack unbalanced");
  if (pushed) verify_table(top + 1, t);
  return 0;
}

static void push_and_verify(const amqp_table_t *t) {
  lua_pushcfunction(L, protected_push);
  lua_pushlightuserdata(L, (void *)t);
  int st = lua_pcall(L, 1, 0, 0);
  /* only a memory error could be raised: report anything else */
  FUZZ_CHECK(st == LUA_OK || st == LUA_ERRMEM, lua_tostring(L, -1));
  lua_settop(L, 0);
}

int LLVMFuzzerInitialize(int *argc, char ***argv);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerInitialize(int *argc, char ***argv) {
  (void)argc, (void)argv;
  L = luaL_newstate();
  FUZZ_CHECK(L != NULL, "no Lua state");
  init_amqp_pool(&pool, 4096);
  return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  struct fuzz_input in = {data, size};
  uint8_t mode = fuzz_byte(&in) % 3;
  if (mode == 2) {
    amqp_field_value_t v;
    int nodes = 0;
    v.kind = AMQP_FIELD_KIND_TABLE;
    v.value.table.num_entries = build_count(&in, 0, &nodes);
    v.value.table.entries = NULL;
    /* one level built by hand so that the top is a table */
    amqp_table_t *t = &v.value.table;
    if (t->num_entries) {
      t->entries = amqp_pool_alloc(&pool, sizeof(amqp_table_entry_t) * (size_t)t->num_entries);
      FUZZ_CHECK(t->entries != NULL, "out of memory");
      for (int i = 0; i < t->num_entries; i++) {
        build_bytes(&in, &t->entries[i].key, 7);
        build_value(&in, &t->entries[i].value, 1, &nodes);
      }
    }
    push_and_verify(t);
  } else {
    /* the decoders read from a private copy of exactly the input's size */
    size_t len = in.len + (mode == 0 ? 4 : 0);
    uint8_t *buf = malloc(len ? len : 1);
    FUZZ_CHECK(buf != NULL, "out of memory");
    amqp_bytes_t encoded = {len, buf};
    if (mode == 0) {  /* the table's own length prefix, then its entries */
      buf[0] = (uint8_t)(in.len >> 24), buf[1] = (uint8_t)(in.len >> 16);
      buf[2] = (uint8_t)(in.len >> 8), buf[3] = (uint8_t)in.len;
      if (in.len) memcpy(buf + 4, in.p, in.len);
      amqp_table_t t;
      size_t offset = 0;
      if (amqp_decode_table(encoded, &pool, &t, &offset) == AMQP_STATUS_OK) push_and_verify(&t);
    } else {
      if (in.len) memcpy(buf, in.p, in.len);
      void *decoded = NULL;
      if (amqp_decode_properties(AMQP_BASIC_CLASS, &pool, encoded, &decoded) == AMQP_STATUS_OK) {
        const amqp_basic_properties_t *p = decoded;
        if (p->_flags & AMQP_BASIC_HEADERS_FLAG) push_and_verify(&p->headers);
      }
    }
    free(buf);
  }
  recycle_amqp_pool(&pool);
  return 0;
}
