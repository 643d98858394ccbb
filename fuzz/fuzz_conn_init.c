/* libFuzzer target: conn_init (csrc/connection.c), the url/urls/tls/heartbeat/connect_timeout/
 * max_body options, in a real lua_State under lua_pcall.
 *
 * The input builds an options table: keys from the options rpc.client and rpc.server know
 * (and a few they do not), values mostly of the right type (urls assembled from scheme, user,
 * password, host, port and vhost pieces, or raw bytes, NULs included) and sometimes any value.
 * Tables sometimes carry a metatable whose every metamethod aborts: options are read raw.
 * As in client.c and server.c, the table is at argument 2 or 3 and opts_check_keys usually
 * runs first (always when the value is not a table: conn_init may assume nil or a table).
 * Sometimes Lua allocations start failing after a few, so errors are raised with things
 * allocated. Whatever happens, conn_free then releases everything (ASan/LSan check that).
 *
 * A bad argument is fine. Not fine: a crash, a leak, a metamethod run, an unbalanced stack, a
 * result out of its documented range, or the password in an endpoint's `where` or in any
 * error message. */
#define _POSIX_C_SOURCE 200809L  /* setenv */
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "../csrc/rpc.h"
#include "fuzz.h"

#define PASSWORD "s3cr3t-PW"   /* the only password the urls use, so a leak of it is visible */

static lua_State *L;
static long alloc_budget = -1;  /* Lua allocations left before they fail; -1: no limit */

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

static int metamethod_ran(lua_State *L1) {
  (void)L1;
  FUZZ_CHECK(0, "a metamethod of an options table ran: options must be read raw");
  return 0;
}

/* Sometimes gives the table on top a metatable whose every metamethod aborts. */
static void maybe_trap(struct fuzz_input *in) {
  static const char *const events[] = {"__index", "__newindex", "__len", "__pairs", "__eq",
                                       "__call", "__tostring", "__name", "__close", "__concat"};
  if (fuzz_byte(in) % 4) return;
  lua_createtable(L, 0, 10);
  for (size_t i = 0; i < sizeof events / sizeof *events; i++) {
    lua_pushcfunction(L, metamethod_ran);
    lua_setfield(L, -2, events[i]);
  }
  lua_setmetatable(L, -2);
}

/* Pushes one of the strings in list (a NULL-terminated array), or up to 16 raw bytes. */
static void push_piece(struct fuzz_input *in, luaL_Buffer *b, const char *const list[], size_t n) {
  uint8_t pick = fuzz_byte(in);
  if (pick < n) {
    luaL_addstring(b, list[pick]);
  } else if (pick < 250) {
    luaL_addstring(b, list[pick % n]);
  } else if (pick == 250) {
    for (int i = 0; i < 300; i++) luaL_addchar(b, (char)('a' + i % 26));
  } else {
    size_t len;
    const char *s = fuzz_bytes(in, fuzz_byte(in) % 17, &len);
    luaL_addlstring(b, s, len);
  }
}

#define PIECE(in, b, list) push_piece(in, b, list, sizeof list / sizeof *list)

static void push_url(struct fuzz_input *in) {
  static const char *const schemes[] = {"amqp://", "amqps://", "amqp://", "amqps://", "AMQP://",
                                        "amqp:/", "amqp:", "http://", "", "amqp://amqp://"};
  static const char *const users[] = {"guest", "", "u%40x", "%", "%zz", "%00", "user name", "@", ":"};
  static const char *const passwords[] = {":" PASSWORD "@", "@", ":@", "", ":" PASSWORD "@@",
                                          ":" PASSWORD "%40@", "::@"};
  static const char *const hosts[] = {"localhost", "127.0.0.1", "[::1]", "[::1", "::1]", "",
                                      "h", "%68ost", "-", "[fe80::1%25eth0]", "[]"};
  static const char *const ports[] = {"", ":5672", ":0", ":65535", ":65536", ":-1",
                                      ":99999999999999999999", ":", ":5672x", ":+1", ":5671"};
  static const char *const vhosts[] = {"", "/", "//", "/%2f", "/%2F", "/vh", "/%", "/%2",
                                       "/%00", "/a/b", "/?x#y", "/%zz"};
  luaL_Buffer b;
  luaL_buffinit(L, &b);
  PIECE(in, &b, schemes);
  PIECE(in, &b, users);
  PIECE(in, &b, passwords);
  PIECE(in, &b, hosts);
  PIECE(in, &b, ports);
  PIECE(in, &b, vhosts);
  luaL_pushresult(&b);
}

static void push_any(struct fuzz_input *in, int depth);

static void push_number(struct fuzz_input *in) {
  static const lua_Integer ints[] = {0, 1, -1, 60, 3600, 3601, 2147483647, 2147483648,
                                     RPC_MAX_BODY_LIMIT, RPC_MAX_BODY_LIMIT + 1, 134217728,
                                     LUA_MAXINTEGER, LUA_MININTEGER, 1000000, 1000001};
  static const double floats[] = {0.0, 0.001, 0.0009, 1e6, 1e6 + 1e-6, 10.0, 1.5, -1.0, 60.0,
                                  3600.0, 3600.5, 9.3e18, -9.3e18, 1e-300, 5e-324};
  uint8_t pick = fuzz_byte(in);
  size_t ni = sizeof ints / sizeof *ints, nf = sizeof floats / sizeof *floats;
  if (pick < 100) lua_pushinteger(L, ints[pick % ni]);
  else if (pick < 200) lua_pushnumber(L, floats[pick % nf]);
  else if (pick < 210) lua_pushnumber(L, NAN);
  else if (pick < 220) lua_pushnumber(L, pick & 1 ? HUGE_VAL : -HUGE_VAL);
  else if (pick < 235) lua_pushinteger(L, (lua_Integer)fuzz_u64(in));
  else if (pick < 245) {
    uint64_t bits = fuzz_u64(in);
    double d;
    memcpy(&d, &bits, sizeof d);
    lua_pushnumber(L, d);
  } else {  /* a number in a string: Lua's own conversions apply */
    static const char *const texts[] = {"60", "0x10", " 5 ", "1e3", "nan", "10.0", "-0"};
    lua_pushstring(L, texts[pick % (sizeof texts / sizeof *texts)]);
  }
}

static void push_path(struct fuzz_input *in) {
  static const char *const paths[] = {"/nonexistent/ca.pem", "", "/etc/ssl/certs", "ca.pem",
                                      "/dev/null"};
  uint8_t pick = fuzz_byte(in);
  if (pick < 240) {
    lua_pushstring(L, paths[pick % (sizeof paths / sizeof *paths)]);
  } else {
    size_t len;
    const char *s = fuzz_bytes(in, fuzz_byte(in) % 17, &len);
    lua_pushlstring(L, s, len);  /* NULs included */
  }
}

static void push_tls(struct fuzz_input *in, int depth) {
  static const char *const keys[] = {"ca", "cert", "key", "verify", "verify_hostname", "bogus"};
  int n = fuzz_byte(in) % 6;
  lua_createtable(L, 0, n);
  for (int i = 0; i < n; i++) {
    uint8_t k = fuzz_byte(in) % 7;
    if (k == 6) {  /* a key it does not know: raw bytes, or not a string */
      uint8_t other = fuzz_byte(in);
      if (other < 128) {
        size_t len;
        const char *s = fuzz_bytes(in, other % 9, &len);
        lua_pushlstring(L, s, len);
      } else if (other < 192) {
        lua_pushinteger(L, other);
      } else {
        lua_pushboolean(L, other & 1);
      }
    } else {
      lua_pushstring(L, keys[k]);
    }
    uint8_t right = fuzz_byte(in) % 4;
    if (right && k <= 2) push_path(in);
    else if (right && k <= 4) lua_pushboolean(L, right & 1);
    else push_any(in, depth + 1);
    lua_rawset(L, -3);
  }
  maybe_trap(in);
}

static void push_urls(struct fuzz_input *in, int depth) {
  uint8_t pick = fuzz_byte(in);
  int n = pick == 255 ? 65 : pick == 254 ? 64 : pick % 5;
  lua_createtable(L, n, 0);
  for (int i = 1; i <= n; i++) {
    if (fuzz_byte(in) % 8) push_url(in);
    else push_any(in, depth + 1);
    lua_rawseti(L, -2, i);
  }
  if (fuzz_byte(in) % 8 == 0) {  /* a hole or a stray key */
    lua_pushstring(L, "x");
    lua_rawseti(L, -2, n + 2);
  }
  maybe_trap(in);
}

/* Pushes any value (tables only up to depth 3). */
static void push_any(struct fuzz_input *in, int depth) {
  uint8_t pick = fuzz_byte(in) % 11;
  switch (pick) {
    case 0: lua_pushnil(L); break;
    case 1: lua_pushboolean(L, fuzz_byte(in) & 1); break;
    case 2: push_number(in); break;
    case 3: push_url(in); break;
    case 4: {
      size_t len;
      const char *s = fuzz_bytes(in, fuzz_byte(in) % 33, &len);
      lua_pushlstring(L, s, len);
      break;
    }
    case 5: lua_pushcfunction(L, metamethod_ran); break;  /* never called: only a value */
    case 6: lua_pushlightuserdata(L, L); break;
    case 7:
      if (depth < 3) push_urls(in, depth);
      else lua_pushboolean(L, 0);
      break;
    case 8:
      if (depth < 3) push_tls(in, depth);
      else lua_pushboolean(L, 1);
      break;
    case 9: lua_newuserdatauv(L, 1, 0); break;
    default: push_path(in); break;
  }
}

static const char *const option_keys[] = {
    "url", "urls", "heartbeat", "connect_timeout", "max_body", "tls", "timeout", "reply_to",
    "confirm", "durable", "prefetch", "log", "arguments", "reply_to_allow", "bogus", "URL"};

static void push_options(struct fuzz_input *in) {
  int n = fuzz_byte(in) % 8;
  lua_createtable(L, 0, n);
  for (int i = 0; i < n; i++) {
    uint8_t k = fuzz_byte(in);
    const char *key = option_keys[k % (sizeof option_keys / sizeof *option_keys)];
    if (k >= 240) {  /* a key that is not a string */
      if (k & 1) lua_pushinteger(L, k);
      else lua_pushboolean(L, 1);
    } else {
      lua_pushstring(L, key);
    }
    int right = fuzz_byte(in) % 4 != 0;
    if (!right || k >= 240) push_any(in, 1);
    else if (strcmp(key, "url") == 0) push_url(in);
    else if (strcmp(key, "urls") == 0) push_urls(in, 1);
    else if (strcmp(key, "tls") == 0) push_tls(in, 1);
    else if (strcmp(key, "heartbeat") == 0 || strcmp(key, "connect_timeout") == 0 ||
             strcmp(key, "max_body") == 0) push_number(in);
    else push_any(in, 1);
    if (lua_isnil(L, -1)) {
      lua_pop(L, 2);
      continue;
    }
    lua_rawset(L, -3);
  }
  maybe_trap(in);
}

static const char *const client_keys[] = {"url", "urls", "heartbeat", "connect_timeout", "timeout",
                                          "reply_to", "confirm", "max_body", "tls", NULL};

static int contains(const char *s, const char *what) {
  return s && strstr(s, what) != NULL;
}

/* Checks what conn_init made of a successful call. */
static void check_conn(const struct rpc_conn *c, size_t max_body_default, int had_opts) {
  FUZZ_CHECK(c->n_endpoints >= 1 && c->n_endpoints <= 64, "endpoint count out of range");
  FUZZ_CHECK(c->heartbeat >= 0 && c->heartbeat <= 3600, "heartbeat out of range");
  FUZZ_CHECK(c->connect_timeout >= 0.001 && c->connect_timeout <= RPC_MAX_TIMEOUT,
             "connect_timeout out of range");
  FUZZ_CHECK(c->max_body <= RPC_MAX_BODY_LIMIT, "max_body out of range");
  if (!had_opts) FUZZ_CHECK(c->max_body == max_body_default, "max_body default not applied");
  FUZZ_CHECK(c->where == c->endpoints[0].where, "where is not the first endpoint's");
  int any_tls = 0;
  for (int i = 0; i < c->n_endpoints; i++) {
    const struct rpc_endpoint *e = &c->endpoints[i];
    FUZZ_CHECK(e->host && e->user && e->password && e->vhost && e->where, "endpoint incomplete");
    FUZZ_CHECK(e->port >= 0 && e->port <= 65535, "port out of range");  /* rabbitmq-c takes :0 */
    FUZZ_CHECK(*e->vhost, "empty vhost: amqp://host/ means vhost /");
    any_tls |= e->tls;
    char want[2048];
    snprintf(want, sizeof want, "%s://%s@%s:%d/%s", e->tls ? "amqps" : "amqp", e->user, e->host,
             e->port, strcmp(e->vhost, "/") == 0 ? "" : e->vhost);
    FUZZ_CHECK(strlen(want) >= sizeof want - 1 || strcmp(e->where, want) == 0, "where is not scheme://user@host:port/vhost");
    if (strcmp(e->password, PASSWORD) == 0 && !contains(e->user, PASSWORD) &&
        !contains(e->host, PASSWORD) && !contains(e->vhost, PASSWORD))
      FUZZ_CHECK(!contains(e->where, PASSWORD), "the password shows in where");
  }
  if (c->tls.ca || c->tls.cert || c->tls.key || !c->tls.verify || !c->tls.verify_hostname)
    FUZZ_CHECK(any_tls, "tls options kept with no amqps:// url");
  FUZZ_CHECK(!c->tls.cert == !c->tls.key, "tls cert without key, or key without cert");
  FUZZ_CHECK(!c->tls.ca || *c->tls.ca, "empty tls.ca path kept");
  FUZZ_CHECK(!c->tls.cert || *c->tls.cert, "empty tls.cert path kept");
}

struct run {
  struct fuzz_input in;
  struct rpc_conn conn;
};

static int protected_init(lua_State *L1) {
  struct run *r = lua_touserdata(L1, 1);
  struct fuzz_input *in = &r->in;
  lua_settop(L1, 0);
  uint8_t how = fuzz_byte(in);
  uint8_t budget = fuzz_byte(in);
  int idx = how & 1 ? 3 : 2;                 /* rpc.server's or rpc.client's options */
  size_t max_body = how & 1 ? 16777216 : 134217728;
  for (int i = 1; i < idx; i++) lua_pushliteral(L1, "queue");
  uint8_t what = (uint8_t)(how >> 1) % 16;
  int had_opts = 1;
  if (what == 0) had_opts = 0;                          /* none: the defaults, RPC_URL */
  else if (what == 1) lua_pushnil(L1), had_opts = 0;
  else if (what == 2) push_any(in, 0);
  else push_options(in);
  if (!lua_isnoneornil(L1, idx) && !lua_istable(L1, idx))
    opts_check_keys(L1, idx, client_keys);  /* raises: conn_init is never given this */
  if (how & 64) opts_check_keys(L1, idx, client_keys);
  int top = lua_gettop(L1);
  if (budget < 64) alloc_budget = budget;  /* from here on, Lua allocations may fail */
  conn_init(L1, &r->conn, idx, max_body);
  alloc_budget = -1;
  FUZZ_CHECK(lua_gettop(L1) == top, "conn_init left the stack unbalanced");
  check_conn(&r->conn, max_body, had_opts);
  return 0;
}

int LLVMFuzzerInitialize(int *argc, char ***argv);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerInitialize(int *argc, char ***argv) {
  (void)argc, (void)argv;
  L = lua_newstate(limited_alloc, NULL);
  FUZZ_CHECK(L != NULL, "no Lua state");
  return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  static const char *const envs[] = {NULL, "", "amqp://guest:" PASSWORD "@localhost:5673/",
                                     "amqps://u:" PASSWORD "@h/", "nonsense", "amqp://"};
  struct run r;
  memset(&r, 0, sizeof r);
  r.in.p = data;
  r.in.len = size;
  const char *env = envs[fuzz_byte(&r.in) % (sizeof envs / sizeof *envs)];
  if (env) setenv("RPC_URL", env, 1);  /* the same few strings: glibc keeps no new copies */
  else unsetenv("RPC_URL");
  lua_pushcfunction(L, protected_init);
  lua_pushlightuserdata(L, &r);
  int st = lua_pcall(L, 1, 0, 0);
  alloc_budget = -1;
  if (st != LUA_OK) {
    const char *msg = lua_tostring(L, -1);
    FUZZ_CHECK(msg != NULL, "an error that is not a string");
    FUZZ_CHECK(st == LUA_ERRMEM || strncmp(msg, "bad argument #", 14) == 0 ||
               strcmp(msg, "not enough memory") == 0, msg);
    FUZZ_CHECK(!contains(msg, PASSWORD), "the password shows in an error message");
  }
  lua_settop(L, 0);
  conn_free(&r.conn);
  FUZZ_CHECK(r.conn.endpoints == NULL && r.conn.tls.ca == NULL && r.conn.tls.cert == NULL &&
             r.conn.tls.key == NULL, "conn_free left pointers behind");
  return 0;
}
