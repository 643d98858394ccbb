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

#include "rpc.h"

#define MAX_POLLED 64

struct rpc_loop {
  struct rpc_watch *watches;   /* newest first */
  unsigned long interrupts;    /* Ctrl-Cs inline handlers took (loop_note_interrupt) */
};

static const char LOOP_KEY = 'L';  /* its address keys the loop in the registry */

/* The loop's user value is a table from watch pointer to its object's userdata: what is
 * watched stays alive, as a listening socket would, until it is closed. */
struct rpc_loop *loop_get(lua_State *L) {
  if (lua_rawgetp(L, LUA_REGISTRYINDEX, &LOOP_KEY) == LUA_TNIL) {
    lua_pop(L, 1);
    struct rpc_loop *loop = lua_newuserdatauv(L, sizeof *loop, 1);
    loop->watches = NULL;
    loop->interrupts = 0;
    lua_newtable(L);
    lua_setiuservalue(L, -2, 1);
    lua_pushvalue(L, -1);
    lua_rawsetp(L, LUA_REGISTRYINDEX, &LOOP_KEY);
  }
  struct rpc_loop *loop = lua_touserdata(L, -1);
  lua_pop(L, 1);
  return loop;
}

static void push_anchors(lua_State *L) {
  lua_rawgetp(L, LUA_REGISTRYINDEX, &LOOP_KEY);
  lua_getiuservalue(L, -1, 1);
  lua_remove(L, -2);
}

void loop_add(lua_State *L, struct rpc_loop *loop, struct rpc_watch *w, int idx) {
  idx = lua_absindex(L, idx);
  push_anchors(L);
  lua_pushvalue(L, idx);
  lua_rawsetp(L, -2, w);
  lua_pop(L, 1);
  w->next = loop->watches;
  loop->watches = w;
}

void loop_remove(lua_State *L, struct rpc_loop *loop, struct rpc_watch *w) {
  for (struct rpc_watch **it = &loop->watches; *it; it = &(*it)->next) {
    if (*it != w) continue;
    *it = w->next;
    break;
  }
  w->next = NULL;
  push_anchors(L);
  lua_pushnil(L);
  lua_rawsetp(L, -2, w);
  lua_pop(L, 1);
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
  push_anchors(L);
  lua_rawgetp(L, -1, w);
  w->ops->step(L, lua_gettop(L), limit);
  lua_pop(L, 2);
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
  if (own && (conn_has_input(own) || now - own->last_pumped > RPC_HEARTBEAT_READ)) return 1;
  /* a reconnect must not hold a waiting call past its deadline (run() has no real one) */
  double limit = own ? fmax(deadline - now, 0.05) : HUGE_VAL;
  if (step_ready(L, loop, own, now, limit)) return own != NULL;

  struct pollfd fds[MAX_POLLED];
  struct rpc_watch *polled[MAX_POLLED];
  nfds_t n = 0;
  double until = fmin(deadline, now + RPC_SLICE);
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
  return 0;  /* nothing, or EINTR: the caller looks at its deadline and signals */
}

/* SIGINT/SIGTERM only set a flag while a server runs; run() notices within one slice. This is
 * the one process-wide state: a signal handler has no Lua state to write to. Nested runs (a
 * handler that runs another server) install the handlers once. */
static volatile sig_atomic_t signalled;  /* the signal's number */
static int catching;
static struct sigaction saved_int, saved_term;

static void on_signal(int sig) {
  signalled = sig;
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

void loop_note_interrupt(struct rpc_loop *loop) {
  loop->interrupts++;
}

unsigned long loop_interrupts(const struct rpc_loop *loop) {
  return loop->interrupts;
}
