/* libFuzzer target: table_from_lua (csrc/table.c), Lua tables to AMQP field tables (request
 * headers, queue arguments), in a real lua_State under lua_pcall.
 *
 * The input builds a table: keys mostly strings (empty, short, 255 and 256 bytes, raw bytes),
 * sometimes numbers, booleans or tables; values strings (up to 128 KiB, around the encoded
 * size cap), integers, floats (NaN and infinities too), booleans, and sometimes tables,
 * functions or userdata. table_from_lua runs on it at argument position 1 to 3, with or
 * without a pool, and Lua allocations sometimes start failing part way.
 *
 * A raised error must be a bad argument naming the given argument (or a memory error). A table
 * it accepts must: leave the stack as it was; give one entry per key, each the right kind and
 * value; encode (amqp_encode_table) into RPC_MAX_TABLE bytes, as the size check promises; and
 * come back through amqp_decode_table and table_push as the same Lua table. */
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "../csrc/rpc.h"
#include "fuzz.h"

static lua_State *L;
static amqp_pool_t pool;
static void *encode_buf;
static long alloc_budget = -1;

static void *limited_alloc(void *ud, void *ptr, size_t osize, size_t nsize) {
  (void)ud;
  if (nsize == 0) {
    free(ptr);
    return NULL;
  }
  if (alloc_budget >= 0 && nsize > (ptr ? osize : 0)) {
    if (alloc_budget == 0) return NULL;
    alloc_budget--;
  }
  return realloc(ptr, nsize);
}

static void push_filled(struct fuzz_input *in, size_t len) {
  char fill = (char)fuzz_byte(in);
  luaL_Buffer b;
  char *p = luaL_buffinitsize(L, &b, len);
  memset(p, fill, len);
  luaL_pushresultsize(&b, len);
}

static void push_key(struct fuzz_input *in) {
  static const size_t lengths[] = {0, 1, 8, 254, 255, 256, 1000};
  uint8_t pick = fuzz_byte(in);
  if (pick < 160) {
    size_t len;
    const char *s = fuzz_bytes(in, pick % 9, &len);
    lua_pushlstring(L, s, len);
  } else if (pick < 230) {
    push_filled(in, lengths[pick % (sizeof lengths / sizeof *lengths)]);
  } else if (pick < 240) {
    lua_pushinteger(L, pick);
  } else if (pick < 245) {
    lua_pushnumber(L, 0.5);
  } else if (pick < 250) {
    lua_pushboolean(L, 1);
  } else {
    lua_newtable(L);
  }
}

static void push_value(struct fuzz_input *in) {
  uint8_t pick = fuzz_byte(in);
  switch (pick % 12) {
    case 0: case 1: {
      size_t len;
      const char *s = fuzz_bytes(in, fuzz_byte(in) % 33, &len);
      lua_pushlstring(L, s, len);
      break;
    }
    case 2: {  /* up to 128 KiB: the encoded size cap is RPC_MAX_TABLE */
      size_t len = (size_t)fuzz_u16(in) * 2 + (fuzz_byte(in) & 1);
      push_filled(in, len);
      break;
    }
    case 3: {
      size_t len = (size_t)RPC_MAX_TABLE - 16 + fuzz_byte(in) % 32;  /* right at the cap */
      push_filled(in, len);
      break;
    }
    case 4: lua_pushinteger(L, (lua_Integer)fuzz_u64(in)); break;
    case 5: {
      static const lua_Integer special[] = {0, -1, LUA_MAXINTEGER, LUA_MININTEGER};
      lua_pushinteger(L, special[pick / 12 % 4]);
      break;
    }
    case 6: {
      uint64_t bits = fuzz_u64(in);
      double d;
      memcpy(&d, &bits, sizeof d);
      lua_pushnumber(L, d);
      break;
    }
    case 7: {
      static const double special[] = {NAN, HUGE_VAL, -HUGE_VAL, 0.0, -0.0, 1.0, 0.5, 1e308};
      lua_pushnumber(L, special[pick / 12 % 8]);
      break;
    }
    case 8: case 9: lua_pushboolean(L, pick & 16); break;
    case 10: lua_newtable(L); break;
    default:
      if (pick & 16) lua_pushcfunction(L, lua_gettop);
      else lua_newuserdatauv(L, 0, 0);
      break;
  }
}

/* The Lua value on top against an encoded entry's value, as value_from_lua makes it. */
static void check_field(const amqp_field_value_t *v) {
  switch (lua_type(L, -1)) {
    case LUA_TSTRING: {
      size_t len;
      const char *s = lua_tolstring(L, -1, &len);
      FUZZ_CHECK(v->kind == AMQP_FIELD_KIND_UTF8 && v->value.bytes.len == len &&
                 (!len || memcmp(v->value.bytes.bytes, s, len) == 0), "string entry");
      break;
    }
    case LUA_TNUMBER:
      if (lua_isinteger(L, -1)) {
        FUZZ_CHECK(v->kind == AMQP_FIELD_KIND_I64 && v->value.i64 == lua_tointeger(L, -1),
                   "integer entry");
      } else {
        lua_Number d = lua_tonumber(L, -1);
        FUZZ_CHECK(v->kind == AMQP_FIELD_KIND_F64 &&
                   (memcmp(&v->value.f64, &d, sizeof d) == 0), "float entry");
      }
      break;
    case LUA_TBOOLEAN:
      FUZZ_CHECK(v->kind == AMQP_FIELD_KIND_BOOLEAN &&
                 (v->value.boolean != 0) == lua_toboolean(L, -1), "boolean entry");
      break;
    default:
      FUZZ_CHECK(0, "an entry table_from_lua should have refused");
  }
}

/* The tables at a and b hold the same keys and values (floats bit for bit, NaN included). */
static void check_same(int a, int b) {
  lua_Integer na = 0, nb = 0;
  lua_pushnil(L);
  while (lua_next(L, a)) {
    na++;
    lua_pushvalue(L, -2);
    lua_rawget(L, b);
    FUZZ_CHECK(lua_type(L, -1) == lua_type(L, -2), "round trip changed a value's type");
    if (lua_type(L, -1) == LUA_TNUMBER) {
      FUZZ_CHECK(lua_isinteger(L, -1) == lua_isinteger(L, -2), "round trip changed a number's subtype");
      lua_Number x = lua_tonumber(L, -1), y = lua_tonumber(L, -2);
      FUZZ_CHECK(memcmp(&x, &y, sizeof x) == 0 || lua_rawequal(L, -1, -2), "round trip changed a number");
    } else {
      FUZZ_CHECK(lua_rawequal(L, -1, -2), "round trip changed a value");
    }
    lua_pop(L, 2);
  }
  lua_pushnil(L);
  while (lua_next(L, b)) {
    nb++;
    lua_pop(L, 1);
  }
  FUZZ_CHECK(na == nb, "round trip added or lost keys");
}

struct run {
  struct fuzz_input in;
  int argn;
};

static int protected_convert(lua_State *L1) {
  struct run *r = lua_touserdata(L1, 1);
  struct fuzz_input *in = &r->in;
  lua_settop(L1, 0);
  uint8_t how = fuzz_byte(in);
  uint8_t budget = fuzz_byte(in);
  int idx = 1 + how % 3;
  int with_pool = how & 4;
  r->argn = 1 + (how >> 3) % 5;
  for (int i = 1; i < idx; i++) lua_pushliteral(L1, "filler");
  uint8_t n = fuzz_byte(in);
  int entries = n < 250 ? n % 12 : 200 + n;  /* sometimes many */
  lua_createtable(L1, 0, entries);
  for (int i = 0; i < entries; i++) {
    push_key(in);
    push_value(in);
    lua_rawset(L1, idx);
  }
  lua_Integer count = 0;
  lua_pushnil(L1);
  while (lua_next(L1, idx)) {
    lua_pop(L1, 1);
    count++;
  }
  int top = lua_gettop(L1);
  amqp_table_t out = {-1, NULL};
  if (budget < 32) alloc_budget = budget;
  table_from_lua(L1, idx, r->argn, with_pool ? &pool : NULL, with_pool ? &out : NULL);
  alloc_budget = -1;
  FUZZ_CHECK(lua_gettop(L1) == top, "table_from_lua left the stack unbalanced");
  if (!with_pool) return 0;

  FUZZ_CHECK(out.num_entries == count, "an entry too many or too few");
  for (int i = 0; i < out.num_entries; i++) {
    const amqp_table_entry_t *e = &out.entries[i];
    FUZZ_CHECK(e->key.len <= 255, "a key longer than a shortstr");
    lua_pushlstring(L1, e->key.bytes, e->key.len);
    FUZZ_CHECK(lua_rawget(L1, idx) != LUA_TNIL, "an entry with a key not in the table");
    check_field(&e->value);
    lua_pop(L1, 1);
  }
  /* the size check promises it encodes within RPC_MAX_TABLE bytes */
  amqp_bytes_t buf = {RPC_MAX_TABLE, encode_buf};
  size_t offset = 0;
  int st = amqp_encode_table(buf, &out, &offset);
  FUZZ_CHECK(st == AMQP_STATUS_OK, "a table table_from_lua accepted does not encode in RPC_MAX_TABLE bytes");
  buf.len = offset;
  amqp_table_t back;
  offset = 0;
  FUZZ_CHECK(amqp_decode_table(buf, &pool, &back, &offset) == AMQP_STATUS_OK, "its encoding does not decode");
  if (table_push(L1, &back)) check_same(idx, lua_gettop(L1));
  else FUZZ_CHECK(count > 1024, "table_push refused a flat table of at most 1024 entries");
  return 0;
}

int LLVMFuzzerInitialize(int *argc, char ***argv);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerInitialize(int *argc, char ***argv) {
  (void)argc, (void)argv;
  L = lua_newstate(limited_alloc, NULL);
  FUZZ_CHECK(L != NULL, "no Lua state");
  init_amqp_pool(&pool, 4096);
  encode_buf = malloc(RPC_MAX_TABLE);
  FUZZ_CHECK(encode_buf != NULL, "out of memory");
  return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  struct run r = {{data, size}, 0};
  lua_pushcfunction(L, protected_convert);
  lua_pushlightuserdata(L, &r);
  int st = lua_pcall(L, 1, 0, 0);
  alloc_budget = -1;
  if (st != LUA_OK) {
    char want[32];
    snprintf(want, sizeof want, "bad argument #%d ", r.argn);
    const char *msg = lua_tostring(L, -1);
    FUZZ_CHECK(msg != NULL, "an error that is not a string");
    FUZZ_CHECK(st == LUA_ERRMEM || strncmp(msg, want, strlen(want)) == 0 ||
               strcmp(msg, "not enough memory") == 0, msg);
  }
  lua_settop(L, 0);
  recycle_amqp_pool(&pool);
  return 0;
}
