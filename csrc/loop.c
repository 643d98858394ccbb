/* The wait loop: one per Lua state. Whoever waits (a client in call, a server in run or poll)
 * waits here, so everything open in the state is served meanwhile: one process, or one REPL,
 * can define a handler and call it. The loop sees what it serves only through watch records
 * (rpc.h): a file descriptor, input already buffered, the next due time, a step. */
#define _POSIX_C_SOURCE 200809L
#include <errno.h>
#include <math.h>
#include <poll.h>
#include <signal.h>
#include <stdlib.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <unistd.h>
#include <string.h>

#include "rpc.h"

#define MAX_POLLED 64

struct rpc_loop {
  struct rpc_watch *watches;   /* newest first */
  unsigned long interrupts;    /* Ctrl-Cs inline handlers took (loop_note_interrupt) */
  int epfd;                    /* the state's one pollfd for outside loops: an epoll set of the
                                * watches' sockets, which come and go; -1 until asked for */
  int wakefd;                  /* an eventfd in that set: a settled wait of an outside waiter */
  const struct rpc_context *current;  /* of the request thread being run, or NULL */
  lua_State *starting;         /* the request thread loop_start runs: owned, though not yet in
                                * UV_OWNED (only a thread that suspends is recorded there) */
  lua_State *adopting;         /* suspended in its first run, being recorded: not resumed yet */
  int any_due;                 /* UV_DUE may have entries: 0 once a look found it empty */
};

/* Closes the epoll set with the state (lua_close). */
static int loop_gc(lua_State *L) {
  struct rpc_loop *loop = lua_touserdata(L, 1);
  if (loop->epfd >= 0) close(loop->epfd);
  if (loop->wakefd >= 0) close(loop->wakefd);
  loop->epfd = loop->wakefd = -1;
  return 0;
}

static const char LOOP_KEY = 'L';  /* its address keys the loop in the registry */

/* The loop's user values, tables keyed by pointers (light userdata):
 * UV_ANCHORS: watch -> its object, kept alive (servers, as a listening socket would be);
 * UV_WEAK: watch -> its object, not kept alive (clients: collected when dropped);
 * UV_SUSPENDED: thread -> the thread, while it waits (lua_yieldk) for a wake or its due time;
 * UV_DUE: thread -> when to resume it (0 once woken);
 * UV_OWNED: thread -> its abort function, for the threads the scheduler runs (requests) once
 *   they have suspended; weak keys, so a collected thread takes its entry along;
 * UV_CONTEXT: thread -> its request's context (light userdata), for those of them that have
 *   one; weak keys;
 * UV_OUTSIDE: an outside scheduler's yield protocol (rpc.cqueues), or nil: {marker, running}. */
enum { UV_ANCHORS = 1, UV_WEAK, UV_SUSPENDED, UV_DUE, UV_OWNED, UV_CONTEXT, UV_OUTSIDE, UV_COUNT = UV_OUTSIDE };

static void push_loop(lua_State *L) {
  lua_rawgetp(L, LUA_REGISTRYINDEX, &LOOP_KEY);
}

struct rpc_loop *loop_get(lua_State *L) {
  if (lua_rawgetp(L, LUA_REGISTRYINDEX, &LOOP_KEY) == LUA_TNIL) {
    lua_pop(L, 1);
    struct rpc_loop *loop = lua_newuserdatauv(L, sizeof *loop, UV_COUNT);
    loop->watches = NULL;
    loop->interrupts = 0;
    loop->epfd = loop->wakefd = -1;
    loop->current = NULL;
    loop->starting = loop->adopting = NULL;
    loop->any_due = 0;
    lua_createtable(L, 0, 1);
    lua_pushcfunction(L, loop_gc);
    lua_setfield(L, -2, "__gc");
    lua_setmetatable(L, -2);
    for (int uv = 1; uv < UV_OUTSIDE; uv++) {
      lua_newtable(L);
      if (uv == UV_WEAK || uv == UV_OWNED || uv == UV_CONTEXT) {
        lua_createtable(L, 0, 1);
        lua_pushstring(L, uv == UV_WEAK ? "v" : "k");
        lua_setfield(L, -2, "__mode");
        lua_setmetatable(L, -2);
      }
      lua_setiuservalue(L, -2, uv);
    }
    lua_pushvalue(L, -1);
    lua_rawsetp(L, LUA_REGISTRYINDEX, &LOOP_KEY);
  }
  struct rpc_loop *loop = lua_touserdata(L, -1);
  lua_pop(L, 1);
  return loop;
}

static void push_table(lua_State *L, int uv) {
  push_loop(L);
  lua_getiuservalue(L, -1, uv);
  lua_remove(L, -2);
}

void loop_add(lua_State *L, struct rpc_loop *loop, struct rpc_watch *w, int idx, int weak) {
  idx = lua_absindex(L, idx);
  push_table(L, weak ? UV_WEAK : UV_ANCHORS);
  lua_pushvalue(L, idx);
  lua_rawsetp(L, -2, w);
  lua_pop(L, 1);
  w->polled_fd = -1;
  w->next = loop->watches;
  loop->watches = w;
}

void loop_remove(lua_State *L, struct rpc_loop *loop, struct rpc_watch *w) {
  if (loop->epfd >= 0 && w->polled_fd >= 0) epoll_ctl(loop->epfd, EPOLL_CTL_DEL, w->polled_fd, NULL);
  w->polled_fd = -1;  /* its socket is still open here: its owner closes it after */
  for (struct rpc_watch **it = &loop->watches; *it; it = &(*it)->next) {
    if (*it != w) continue;
    *it = w->next;
    break;
  }
  w->next = NULL;
  for (int uv = UV_ANCHORS; uv <= UV_WEAK; uv++) {
    push_table(L, uv);
    lua_pushnil(L);
    lua_rawsetp(L, -2, w);
    lua_pop(L, 1);
  }
}

/* Pushes w's object: 0, pushing nil, when it is being collected (a weak one). */
static int push_object(lua_State *L, const struct rpc_watch *w) {
  push_table(L, UV_ANCHORS);
  if (lua_rawgetp(L, -1, w) == LUA_TNIL) {
    lua_pop(L, 2);
    push_table(L, UV_WEAK);
    lua_rawgetp(L, -1, w);
  }
  lua_remove(L, -2);
  return !lua_isnil(L, -1);
}

/* ---- the scheduler: request threads, suspended in their waits, resumed when woken or due ---- */

/* Records T (its value at idx) as owned, with its abort function (at abort) and context. */
static void own(lua_State *L, int idx, int abort, const struct rpc_context *ctx) {
  push_loop(L);
  lua_getiuservalue(L, -1, UV_OWNED);
  lua_pushvalue(L, idx);
  lua_pushvalue(L, abort);
  lua_rawset(L, -3);
  lua_pop(L, 1);
  if (ctx) {
    lua_getiuservalue(L, -1, UV_CONTEXT);
    lua_pushvalue(L, idx);
    lua_pushlightuserdata(L, (void *)ctx);
    lua_rawset(L, -3);
    lua_pop(L, 1);
  }
  lua_pop(L, 1);
}

/* Forgets the thread on top of L's stack (popped) as owned. */
static void forget_owned(lua_State *L) {
  push_loop(L);
  for (int uv = UV_OWNED; uv <= UV_CONTEXT; uv++) {
    lua_getiuservalue(L, -1, uv);
    lua_pushvalue(L, -3);
    lua_pushnil(L);
    lua_rawset(L, -3);
    lua_pop(L, 1);
  }
  lua_pop(L, 2);
}

void loop_disown(lua_State *L) {
  lua_pushthread(L);
  forget_owned(L);
}

const struct rpc_context *loop_context(const struct rpc_loop *loop) {
  return loop ? loop->current : NULL;
}

/* T's request context, or NULL. */
static const struct rpc_context *context_of(lua_State *L, lua_State *T) {
  push_table(L, UV_CONTEXT);
  lua_pushthread(T);
  lua_xmove(T, L, 1);
  const struct rpc_context *ctx = lua_rawget(L, -2) == LUA_TLIGHTUSERDATA ? lua_touserdata(L, -1) : NULL;
  lua_pop(L, 2);
  return ctx;
}

const struct rpc_context *loop_thread_context(lua_State *L) {
  return context_of(L, L);
}

int loop_can_suspend(lua_State *L) {
  if (!lua_isyieldable(L)) return 0;
  if (L == loop_get(L)->starting) return 1;
  push_table(L, UV_OWNED);
  lua_pushthread(L);
  int owned = lua_rawget(L, -2) != LUA_TNIL;
  lua_pop(L, 2);
  return owned;
}

/* Records T as suspended until due; the suspended table keeps it alive. */
static void record(lua_State *L, lua_State *T, double due) {
  lua_pushthread(T);
  lua_xmove(T, L, 1);  /* nothing to move when L is T */
  push_table(L, UV_SUSPENDED);
  lua_pushvalue(L, -2);
  lua_rawsetp(L, -2, T);
  lua_pop(L, 2);
  push_table(L, UV_DUE);
  lua_pushnumber(L, due);
  lua_rawsetp(L, -2, T);
  lua_pop(L, 1);
  loop_get(L)->any_due = 1;
}

void loop_unsuspend(lua_State *L) {
  for (int uv = UV_SUSPENDED; uv <= UV_DUE; uv++) {
    push_table(L, uv);
    lua_pushnil(L);
    lua_rawsetp(L, -2, L);
    lua_pop(L, 1);
  }
}

int loop_suspend(lua_State *L, double due, lua_KContext ctx, lua_KFunction k) {
  record(L, L, due);
  return lua_yieldk(L, 0, ctx, k);
}

void loop_wake(lua_State *L, lua_State *T) {
  push_table(L, UV_DUE);
  if (lua_rawgetp(L, -1, T) == LUA_TNUMBER) {
    lua_pushnumber(L, 0);
    lua_rawsetp(L, -3, T);
  } else {  /* not one of ours: perhaps waiting in an outside loop, on the epoll set */
    struct rpc_loop *loop = loop_get(L);
    uint64_t one = 1;
    if (loop->wakefd >= 0 && write(loop->wakefd, &one, sizeof one) < 0) { /* already pending */ }
  }
  lua_pop(L, 2);
}

void loop_wake_all(lua_State *L) {
  push_table(L, UV_DUE);
  lua_pushnil(L);
  while (lua_next(L, -2)) {
    lua_pop(L, 1);
    lua_pushvalue(L, -1);
    lua_pushnumber(L, 0);
    lua_rawset(L, -4);  /* an existing key: allowed while traversing */
  }
  lua_pop(L, 1);
}

/* Calls the function below the nargs arguments on top (all popped) under protection, and once
 * more if lua.c's Ctrl-C hook raised at the call, before it ran (the hook is gone then; the
 * interrupt is counted, for the waiter). Returns the status, the error left on top. */
static int call_past_ctrl_c(lua_State *L, struct rpc_loop *loop, int nargs) {
  int base = lua_gettop(L) - nargs, st = LUA_OK;
  if (!lua_checkstack(L, nargs + 1)) return lua_pcall(L, nargs, 0, 0);  /* once, then */
  for (int tries = 0; tries < 2; tries++) {
    for (int i = 0; i <= nargs; i++) lua_pushvalue(L, base + i);
    st = lua_pcall(L, nargs, 0, 0);
    if (st == LUA_OK || tries == 1 || !loop_took_interrupt(L, loop)) break;
    lua_pop(L, 1);
  }
  if (st == LUA_OK) {
    lua_settop(L, base - 1);
  } else {
    lua_replace(L, base);
    lua_settop(L, base);
  }
  return st;
}

/* After T's resume returned status with nres results: a thread that yields without suspending
 * itself (a bare coroutine.yield() in a handler) gives the others a turn: it is due again at
 * once. A thread that ends, with results or an error (never for a request: its function
 * catches everything), is left to the collector; one that died outside its own protection
 * (closed by a script, no memory, a C stack overflow) is its owner's to answer for: its abort
 * function, at abort (0: look it up), is called with the error and the thread. */
static void resumed(lua_State *L, struct rpc_loop *loop, lua_State *T, int status, int nres, int abort) {
  if (status == LUA_YIELD) {
    lua_pop(T, nres);
    push_table(L, UV_DUE);
    int suspended = lua_rawgetp(L, -1, T) != LUA_TNIL;
    lua_pop(L, 2);
    if (!suspended) record(L, T, 0);
  } else if (status == LUA_OK) {
    lua_pop(T, nres);
  } else if (abort) {
    lua_pushvalue(L, abort);
    lua_xmove(T, L, 1);  /* the error */
    lua_pushthread(T);
    lua_xmove(T, L, 1);
    if (call_past_ctrl_c(L, loop, 2) != LUA_OK) lua_pop(L, 1);
  } else {
    push_table(L, UV_OWNED);
    lua_pushthread(T);
    lua_xmove(T, L, 1);
    if (lua_rawget(L, -2) == LUA_TFUNCTION) {
      lua_xmove(T, L, 1);  /* the error */
      lua_pushthread(T);
      lua_xmove(T, L, 1);
      if (call_past_ctrl_c(L, loop, 2) != LUA_OK) lua_pop(L, 1);
      lua_pop(L, 1);
      lua_pushthread(T);
      lua_xmove(T, L, 1);
      forget_owned(L);
    } else {
      lua_pop(L, 2);
    }
  }
}

/* Resumes T, a suspended request thread, with its context. */
static void resume(lua_State *L, struct rpc_loop *loop, lua_State *T) {
  int nres = 0;
  const struct rpc_context *outer = loop->current;
  loop->current = context_of(L, T);
  int status = lua_resume(T, L, 0, &nres);
  loop->current = outer;
  resumed(L, loop, T, status, nres, 0);
}

/* The thread at 1, suspended in its first run, recorded as the loop's (its abort function at
 * 2, its context at 3), and due again at once if it yielded without suspending itself. */
static int adopt(lua_State *L) {
  lua_State *T = lua_tothread(L, 1);
  own(L, 1, 2, lua_touserdata(L, 3));
  resumed(L, NULL, T, LUA_YIELD, 0, 0);
  return 0;
}

/* adopt failed (the error on top, popped): the thread at idx is forgotten (setting nil never
 * allocates) and reset (its to-be-closed variables closed in its context), so nothing resumes
 * it, and its abort function at abort answers for it. */
static void abandon(lua_State *L, struct rpc_loop *loop, int idx, int abort,
                    const struct rpc_context *ctx) {
  lua_State *T = lua_tothread(L, idx);
  for (int uv = UV_SUSPENDED; uv <= UV_CONTEXT; uv++) {
    push_table(L, uv);
    lua_pushvalue(L, idx);
    lua_pushnil(L);
    lua_rawset(L, -3);
    lua_pushnil(L);
    lua_rawsetp(L, -2, T);
    lua_pop(L, 1);
  }
  const struct rpc_context *outer = loop->current;
  loop->current = ctx;
  lua_resetthread(T);
  loop->current = outer;
  lua_pushvalue(L, abort);
  lua_insert(L, -2);
  lua_pushvalue(L, idx);
  if (call_past_ctrl_c(L, loop, 2) != LUA_OK) lua_pop(L, 1);
}

int loop_start(lua_State *L, struct rpc_loop *loop, int idx, int nargs, int abort,
               const struct rpc_context *ctx) {
  idx = lua_absindex(L, idx);
  abort = lua_absindex(L, abort);
  lua_State *T = lua_tothread(L, idx);
  int nres = 0;
  const struct rpc_context *outer = loop->current;
  lua_State *outer_starting = loop->starting;
  loop->current = ctx;
  loop->starting = T;
  int status = lua_resume(T, L, nargs, &nres);
  loop->current = outer;
  loop->starting = outer_starting;
  if (status != LUA_YIELD) {
    resumed(L, loop, T, status, nres, abort);
    return 0;
  }
  lua_pop(T, nres);
  /* a hook or finalizer run at adopt's call may turn the loop: T is not resumed before it is
   * the loop's */
  lua_State *outer_adopting = loop->adopting;
  loop->adopting = T;
  lua_pushcfunction(L, adopt);
  lua_pushvalue(L, idx);
  lua_pushvalue(L, abort);
  lua_pushlightuserdata(L, (void *)ctx);
  int st = call_past_ctrl_c(L, loop, 3);
  loop->adopting = outer_adopting;
  if (st == LUA_OK) return 1;
  abandon(L, loop, idx, abort, ctx);
  return 0;
}

#define RESUME_BATCH 32

/* Resumes the threads whose due time has come (woken ones first: they are due at 0). Returns
 * how many; *next gets the earliest due time of those still suspended. */
static int resume_due(lua_State *L, struct rpc_loop *loop, double now, double *next) {
  lua_State *due[RESUME_BATCH];
  int n = 0, seen = 0;
  *next = HUGE_VAL;
  if (!loop->any_due) return 0;  /* a request's loop turn need not walk an empty table */
  push_table(L, UV_DUE);
  lua_pushnil(L);
  while (lua_next(L, -2)) {
    double at = lua_tonumber(L, -1);
    lua_pop(L, 1);
    seen = 1;
    if (lua_touserdata(L, -1) == loop->adopting) continue;
    if (at <= now && n < RESUME_BATCH) due[n++] = (lua_State *)lua_touserdata(L, -1);
    else if (at < *next) *next = at;
  }
  lua_pop(L, 1);
  if (!seen) loop->any_due = 0;  /* record sets it again */
  for (int i = 0; i < n; i++) {
    push_table(L, UV_DUE);
    lua_pushnil(L);
    lua_rawsetp(L, -2, due[i]);
    lua_pop(L, 1);
    push_table(L, UV_SUSPENDED);
    int alive = lua_rawgetp(L, -1, due[i]) == LUA_TTHREAD;
    lua_pushnil(L);
    lua_rawsetp(L, -3, due[i]);
    if (alive) {
      lua_State *T = lua_tothread(L, -1);
      resume(L, loop, T);  /* the thread value stays on L's stack meanwhile: alive */
    }
    lua_pop(L, 2);
  }
  if (n == RESUME_BATCH) *next = now;  /* more are due: look again at once */
  return n;
}

/* Moves w to the end of the list, so a busy one cannot starve the others. */
static void rotate(struct rpc_loop *loop, struct rpc_watch *w) {
  if (!w->next) return;
  struct rpc_watch **it = &loop->watches;
  while (*it != w) it = &(*it)->next;
  *it = w->next;
  while (*it) it = &(*it)->next;
  *it = w;
  w->next = NULL;
}

static void step(lua_State *L, struct rpc_loop *loop, struct rpc_watch *w, double limit) {
  rotate(loop, w);
  if (push_object(L, w)) {
    w->ops->step(L, lua_gettop(L), limit);
  } else {  /* being collected (a weak one): its finalizer, to come, closes it; forget it now */
    if (loop->epfd >= 0 && w->polled_fd >= 0) epoll_ctl(loop->epfd, EPOLL_CTL_DEL, w->polled_fd, NULL);
    w->polled_fd = -1;
    for (struct rpc_watch **it = &loop->watches; *it; it = &(*it)->next) {
      if (*it != w) continue;
      *it = w->next;
      break;
    }
    w->next = NULL;
  }
  lua_pop(L, 1);
}

/* Steps the first watch (but own, which its waiter reads) with input already buffered, or
 * whose due time has come (a read for its heartbeats, a reconnect). */
static int step_ready(lua_State *L, struct rpc_loop *loop, const struct rpc_conn *own, double now,
                      double limit) {
  for (struct rpc_watch *w = loop->watches; w; w = w->next) {
    if (w->conn == own) continue;
    if (w->ops->has_input(w) || now >= w->ops->next_due(w)) {
      step(L, loop, w, limit);
      return 1;
    }
  }
  return 0;
}

/* One turn of the loop: returns 1 when own may have input (it has, or is due a read, or
 * something else was stepped meanwhile, which may take long: look again), 0 after waiting
 * until the deadline, at most RPC_SLICE. A step may have run a handler that settled what the
 * caller waits for, or opened and closed anything: callers check, and turn it again. */
int loop_wait(lua_State *L, struct rpc_loop *loop, struct rpc_conn *own, double deadline) {
  double now = rpc_now();
  /* rabbitmq-c sends and checks heartbeats only inside its calls: have own read often */
  /* (a lost one has nothing to read: its waiter would spin) */
  if (own && own->amqp && (conn_has_input(own) || now - own->last_pumped > RPC_HEARTBEAT_READ)) return 1;
  /* a reconnect must not hold a waiting call past its deadline (run() has no real one) */
  double limit = own ? fmax(deadline - now, 0.05) : HUGE_VAL;
  if (step_ready(L, loop, own, now, limit)) return own != NULL;  /* input first: requests start */
  double wake;  /* the earliest due time of a suspended thread */
  int woke = resume_due(L, loop, now, &wake);
  /* after resuming, a poll that does not wait: threads that yield at once must not starve input */
  if (woke) now = rpc_now();
  struct pollfd fds[MAX_POLLED];
  struct rpc_watch *polled[MAX_POLLED];
  nfds_t n = 0;
  double until = woke ? now : fmin(fmin(deadline, now + RPC_SLICE), wake);
  if (own && conn_fd(own) >= 0) {
    fds[n].fd = conn_fd(own);
    fds[n].events = POLLIN;
    polled[n++] = NULL;
  }
  for (struct rpc_watch *w = loop->watches; w; w = w->next) {
    if (w->conn == own) continue;
    until = fmin(until, w->ops->next_due(w));
    int fd = w->ops->pollfd(w);
    if (fd < 0 || n == MAX_POLLED) continue;
    fds[n].fd = fd;
    fds[n].events = POLLIN;
    polled[n++] = w;
  }
  /* poll even past the deadline: bytes may wait in the socket */
  int ready = poll(fds, n, (int)ceil(fmax(0, until - now) * 1000));
  for (nfds_t i = 0; ready > 0 && i < n; i++) {
    if (!fds[i].revents) continue;
    if (!polled[i]) return 1;
    step(L, loop, polled[i], limit);
    return own != NULL;
  }
  return woke && own != NULL;  /* nothing, or EINTR: the caller looks at its deadline and signals */
}

/* ---- an outside scheduler (rpc.cqueues): waits in its coroutines yield to it ---- */

/* The wait on L may yield to the outside scheduler: L is one of its coroutines. */
int loop_can_yield_outside(lua_State *L) {
  if (!lua_isyieldable(L)) return 0;
  push_loop(L);
  if (lua_getiuservalue(L, -1, UV_OUTSIDE) != LUA_TTABLE) {
    lua_pop(L, 2);
    return 0;
  }
  lua_rawgeti(L, -1, 2);  /* running(): inside one of its coroutines? */
  int inside = lua_pcall(L, 0, 1, 0) == LUA_OK && lua_toboolean(L, -1);
  lua_pop(L, 3);
  return inside;
}

/* Waits in its way (its poll function, called with lua_callk: cqueues reads what was yielded
 * from the frame that yields) until obj (at idx; 0: none) is readable or seconds pass, then
 * goes on in k. */
int loop_yield_outside(lua_State *L, int idx, double seconds, lua_KContext ctx, lua_KFunction k) {
  if (idx) idx = lua_absindex(L, idx);
  push_loop(L);
  lua_getiuservalue(L, -1, UV_OUTSIDE);
  lua_rawgeti(L, -1, 1);  /* its poll: cqueues.poll */
  lua_replace(L, -3);
  lua_pop(L, 1);
  if (idx) lua_pushvalue(L, idx);
  lua_pushnumber(L, fmax(0, seconds));
  lua_callk(L, idx ? 2 : 1, 0, ctx, k);
  return k(L, LUA_OK, ctx);
}

/* rpc.core._outside(poll, running): waits in coroutines for which running() is true wait with
 * poll(obj, seconds), which yields to the outside scheduler (cqueues.poll). */
static int loop_set_outside(lua_State *L) {
  luaL_checkany(L, 1);
  luaL_checktype(L, 2, LUA_TFUNCTION);
  push_loop(L);
  if (lua_isnil(L, -1)) {
    lua_pop(L, 1);
    loop_get(L);
    push_loop(L);
  }
  lua_createtable(L, 2, 0);
  lua_pushvalue(L, 1);
  lua_rawseti(L, -2, 1);
  lua_pushvalue(L, 2);
  lua_rawseti(L, -2, 2);
  lua_setiuservalue(L, -2, UV_OUTSIDE);
  return 0;
}

/* ---- the pollable protocol: what an outside event loop needs (cqueues.poll, luv) ---- */

/* Brings the epoll set up to date with the watches' sockets: the ones gone (closed, which
 * already took them out, or replaced) first, then the new ones, as a new socket may have the
 * number an old one had. Errors are ignored: a socket that cannot be watched is still read at
 * its due time. */
static void sync_epoll(struct rpc_loop *loop) {
  if (loop->epfd < 0) return;
  for (struct rpc_watch *w = loop->watches; w; w = w->next) {
    int fd = w->ops->pollfd(w);
    if (fd != w->polled_fd && w->polled_fd >= 0) epoll_ctl(loop->epfd, EPOLL_CTL_DEL, w->polled_fd, NULL);
  }
  for (struct rpc_watch *w = loop->watches; w; w = w->next) {
    int fd = w->ops->pollfd(w);
    w->polled_fd = fd;
    if (fd < 0) continue;
    /* the same number may be a new socket (a loss and a reconnect since the last sync: the
     * close took the old one out): make sure, MOD, then ADD */
    struct epoll_event ev = {.events = EPOLLIN};
    ev.data.ptr = w;
    if (epoll_ctl(loop->epfd, EPOLL_CTL_MOD, fd, &ev) != 0 && errno == ENOENT)
      epoll_ctl(loop->epfd, EPOLL_CTL_ADD, fd, &ev);
  }
}

/* The state's pollfd, not the object's socket: sockets close and change on reconnects, which an
 * outside loop watching them would trip on; the epoll set of them all stays. */
int loop_pollfd(lua_State *L, struct rpc_loop *loop) {
  if (loop->epfd < 0) {
    loop->epfd = epoll_create1(EPOLL_CLOEXEC);
    loop->wakefd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    struct epoll_event ev = {.events = EPOLLIN};
    ev.data.ptr = NULL;  /* the wake */
    if (loop->epfd >= 0 && loop->wakefd >= 0) epoll_ctl(loop->epfd, EPOLL_CTL_ADD, loop->wakefd, &ev);
  }
  if (loop->epfd < 0) return rpc_fail(L, "connection", "epoll_create1 failed");
  sync_epoll(loop);
  lua_pushinteger(L, loop->epfd);
  return 1;
}

int loop_events(lua_State *L) {
  lua_pushliteral(L, "r");
  return 1;
}

/* Seconds until the state has work without new input (0: it has some now; nil: none). The
 * whole state's, as step does the whole state's work. */
int loop_timeout(lua_State *L, struct rpc_loop *loop) {
  double now = rpc_now(), next = HUGE_VAL;
  for (struct rpc_watch *w = loop->watches; w; w = w->next)
    next = fmin(next, w->ops->has_input(w) ? now : w->ops->next_due(w));
  push_table(L, UV_DUE);
  lua_pushnil(L);
  while (lua_next(L, -2)) {
    next = fmin(next, lua_tonumber(L, -1));
    lua_pop(L, 1);
  }
  lua_pop(L, 1);
  if (next == HUGE_VAL) lua_pushnil(L);
  else lua_pushnumber(L, fmax(0, next - now));
  return 1;
}

/* Does what the state has ready, never waiting for input: buffered and readable input, due
 * reads and reconnects (a reconnect may take up to connect_timeout), due threads. */
int loop_step(lua_State *L, struct rpc_loop *loop) {
  for (int turn = 0; turn < 64; turn++) {
    double now = rpc_now(), wake;
    int did = step_ready(L, loop, NULL, now, HUGE_VAL);
    did |= resume_due(L, loop, rpc_now(), &wake) > 0;
    if (loop->epfd >= 0) {
      uint64_t count;
      if (loop->wakefd >= 0 && read(loop->wakefd, &count, sizeof count) > 0) did = 1;  /* drained */
      sync_epoll(loop);
      struct epoll_event ev[MAX_POLLED];
      int ready = epoll_wait(loop->epfd, ev, MAX_POLLED, 0);
      for (int i = 0; i < ready && !did; i++) {
        for (struct rpc_watch *w = loop->watches; w && ev[i].data.ptr; w = w->next) {
          if (w != ev[i].data.ptr) continue;  /* still watched: not removed since the sync */
          step(L, loop, w, HUGE_VAL);
          did = 1;
          break;  /* the list may have changed */
        }
      }
    } else {
      struct pollfd fds[MAX_POLLED];
      struct rpc_watch *polled[MAX_POLLED];
      nfds_t n = 0;
      for (struct rpc_watch *w = loop->watches; w && n < MAX_POLLED; w = w->next) {
        int fd = w->ops->pollfd(w);
        if (fd < 0) continue;
        fds[n].fd = fd;
        fds[n].events = POLLIN;
        polled[n++] = w;
      }
      if (n && poll(fds, n, 0) > 0) {
        for (nfds_t i = 0; i < n; i++) {
          if (!fds[i].revents) continue;
          step(L, loop, polled[i], HUGE_VAL);
          did = 1;
          break;  /* the list may have changed */
        }
      }
    }
    if (!did) break;
  }
  sync_epoll(loop);
  lua_pushboolean(L, 1);
  return 1;
}

/* rpc.sleep(seconds): in a handler, suspends only it; elsewhere, serves the state meanwhile.
 * true, or nil, message, "interrupted" (Ctrl-C, or a signal run() caught). */
static int sleep_k(lua_State *L, int status, lua_KContext ctx) {
  (void)status;
  (void)ctx;
  lua_settop(L, 1);
  loop_unsuspend(L);
  double due = lua_tonumber(L, 1);
  if (rpc_now() >= due) {
    lua_pushboolean(L, 1);
    return 1;
  }
  return loop_suspend(L, due, 0, sleep_k);  /* woken early: sleep on */
}

/* In an outside scheduler's coroutine: it sleeps there, and the state's work is done on waking. */
static int sleep_outside_k(lua_State *L, int status, lua_KContext ctx) {
  (void)status;
  (void)ctx;
  lua_settop(L, 1);
  double due = lua_tonumber(L, 1);
  struct rpc_loop *loop = loop_get(L);
  loop_step(L, loop);
  lua_settop(L, 1);
  if (rpc_now() >= due) {
    lua_pushboolean(L, 1);
    return 1;
  }
  return loop_yield_outside(L, 0, due - rpc_now(), 0, sleep_outside_k);
}

static int loop_sleep(lua_State *L) {
  double seconds = luaL_checknumber(L, 1);
  luaL_argcheck(L, seconds >= 0 && seconds <= RPC_MAX_TIMEOUT, 1,
                "seconds must be a number from 0 to 1e6");
  double due = rpc_now() + seconds;
  lua_settop(L, 0);
  lua_pushnumber(L, due);
  if (loop_can_suspend(L)) return sleep_k(L, LUA_OK, 0);
  if (loop_can_yield_outside(L)) return sleep_outside_k(L, LUA_OK, 0);
  struct rpc_loop *loop = loop_get(L);
  lua_Hook hook = lua_gethook(L);
  unsigned long interrupts = loop_interrupts(loop);
  while (rpc_now() < due) {
    if (lua_gethook(L) != hook || loop_interrupts(loop) != interrupts || loop_signalled()) {
      lua_pushnil(L);
      lua_pushliteral(L, "interrupted while sleeping");
      lua_pushliteral(L, "interrupted");
      return 3;
    }
    loop_wait(L, loop, NULL, due);
  }
  lua_pushboolean(L, 1);
  return 1;
}

int rpc_loop_open(lua_State *L) {
  lua_pushcfunction(L, loop_sleep);
  lua_setfield(L, -2, "sleep");
  lua_pushcfunction(L, loop_set_outside);
  lua_setfield(L, -2, "_outside");
  return 0;
}

/* SIGINT/SIGTERM only set a flag while a server runs; run() notices within one slice. This is
 * the one process-wide state: a signal handler has no Lua state to write to. Nested runs (a
 * handler that runs another server) install the handlers once. */
static volatile sig_atomic_t signalled;  /* the signal's number */
static volatile sig_atomic_t signals;    /* how many came: a second one ends a drain */
static int catching;
static struct sigaction saved_int, saved_term;

static void on_signal(int sig) {
  signalled = sig;
  signals++;
}

int loop_signals(void) {
  return signals;
}

void loop_catch_signals(int on) {
  if (on ? catching++ > 0 : --catching > 0) return;
  if (on) {
    struct sigaction sa;
    sa.sa_handler = on_signal;
    sigemptyset(&sa.sa_mask);
    sa.sa_flags = 0;  /* no SA_RESTART: poll() returns at once */
    signalled = 0;
    sigaction(SIGINT, &sa, &saved_int);
    sigaction(SIGTERM, &sa, &saved_term);
  } else {
    sigaction(SIGINT, &saved_int, NULL);
    sigaction(SIGTERM, &saved_term, NULL);
    signalled = 0;  /* the runs it ended have returned: later waits must not see it */
  }
}

int loop_signalled(void) {
  return signalled;
}

/* lua.c answers SIGINT with a hook that raises "interrupted!" and resets SIGINT to its default
 * (a second one kills). A handler that a wait runs inline may take that error as its own: its
 * server asks whether SIGINT was caught before the handler (outside run(), which owns the
 * signals) and reset after it failed. */
int loop_sigint_armed(void) {
  struct sigaction sa;
  return !catching && sigaction(SIGINT, NULL, &sa) == 0 && sa.sa_handler != SIG_DFL &&
         sa.sa_handler != SIG_IGN;
}

int loop_sigint_fired(void) {
  struct sigaction sa;
  return sigaction(SIGINT, NULL, &sa) == 0 && sa.sa_handler == SIG_DFL;
}

/* The error on top, caught by one of our own protected calls, is lua.c's "interrupted!": its
 * hook fires at call and return events too, so it can land in our lua_pcall of a C function.
 * Counted as a Ctrl-C taken (loop_note_interrupt); 1 if so. */
int loop_took_interrupt(lua_State *L, struct rpc_loop *loop) {
  static const char interrupted[] = "interrupted!";
  size_t len;
  const char *e = lua_type(L, -1) == LUA_TSTRING ? lua_tolstring(L, -1, &len) : NULL;
  if (!e || len < sizeof interrupted - 1 || strcmp(e + len - (sizeof interrupted - 1), interrupted) != 0 ||
      !loop || !loop_sigint_fired())
    return 0;
  loop_note_interrupt(loop);
  return 1;
}

void loop_note_interrupt(struct rpc_loop *loop) {
  loop->interrupts++;
}

unsigned long loop_interrupts(const struct rpc_loop *loop) {
  return loop->interrupts;
}
