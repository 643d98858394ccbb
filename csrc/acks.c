/* Batched acks: a server's deliveries in the order they came (on one channel their tags rise),
 * each marked done once its reply went out. acks_flush queues one basic.ack with multiple =
 * true for the done ones at the front, where the broker counts one ack where it counted many,
 * and single acks for the done ones behind a request still under way, so that a slow handler
 * never keeps the prefetch window shut. At-least-once: nothing is acked before it is done. */
#include "rpc.h"

#include <stdlib.h>

enum { UNDER_WAY, DONE };

static size_t at(const struct rpc_acks *a, size_t i) {
  return (a->head + i) & (a->cap - 1);  /* cap is a power of two */
}

static int grow(struct rpc_acks *a) {
  size_t cap = a->cap ? a->cap * 2 : 64;
  uint64_t *tags = malloc(cap * sizeof *tags);
  unsigned char *state = malloc(cap);
  if (!tags || !state) {
    free(tags);
    free(state);
    return -1;
  }
  for (size_t i = 0; i < a->count; i++) {
    tags[i] = a->tags[at(a, i)];
    state[i] = a->state[at(a, i)];
  }
  free(a->tags);
  free(a->state);
  a->tags = tags;
  a->state = state;
  a->head = 0;
  a->cap = cap;
  return 0;
}

/* Notes a delivery. -1 when there is no memory to note it: the caller acks it alone, and no
 * ack covers others until it is done (acks_untracked). */
int acks_track(struct rpc_acks *a, uint64_t tag) {
  if (a->count == a->cap && grow(a)) {
    a->untracked++;
    return -1;
  }
  size_t i = at(a, a->count++);
  a->tags[i] = tag;
  a->state[i] = UNDER_WAY;
  return 0;
}

static size_t find(const struct rpc_acks *a, uint64_t tag) {
  if (!a->count || tag < a->tags[a->head]) return a->count;
  size_t i = (size_t)(tag - a->tags[a->head]);  /* tags run without gaps, but do not rely on it */
  if (i < a->count && a->tags[at(a, i)] == tag) return i;
  for (i = 0; i < a->count && a->tags[at(a, i)] != tag; i++) continue;
  return i;
}

/* The delivery tag is done: 0, or -1 when it was not tracked (from before acks_clear). */
int acks_done(struct rpc_acks *a, uint64_t tag) {
  size_t i = find(a, tag);
  if (i == a->count || a->state[at(a, i)] != UNDER_WAY) return -1;
  a->state[at(a, i)] = DONE;
  a->done++;
  return 0;
}

static void release(struct rpc_acks *a) {
  free(a->tags);
  free(a->state);
  a->tags = NULL;
  a->state = NULL;
  a->cap = a->head = a->count = 0;
}

static void drop(struct rpc_acks *a, size_t i) {
  for (; i + 1 < a->count; i++) {
    a->tags[at(a, i)] = a->tags[at(a, i + 1)];
    a->state[at(a, i)] = a->state[at(a, i + 1)];
  }
  a->count--;
}

/* The delivery was settled otherwise (rejected): no ack may name it. */
void acks_settled(struct rpc_acks *a, uint64_t tag) {
  size_t i = find(a, tag);
  if (i < a->count && a->state[at(a, i)] == UNDER_WAY) drop(a, i);
}

/* Queues the acks for what is done on c; -1 when c was lost doing so. What stays in the ring
 * is only what is under way: at most the prefetch window, however long one request takes. */
int acks_flush(struct rpc_acks *a, struct rpc_conn *c) {
  int batch = !a->untracked;  /* an untracked delivery may be among the lower tags */
  size_t n = 0;
  uint64_t last = 0;
  for (; n < a->count && a->state[at(a, n)] == DONE; n++) {
    last = a->tags[at(a, n)];
    if (!batch && conn_queue_ack(c, last, 0)) return -1;
  }
  if (batch && n && conn_queue_ack(c, last, n > 1)) return -1;
  a->head = at(a, n);
  a->count -= n;
  size_t kept = 0;
  for (size_t i = 0; i < a->count; i++) {  /* done behind one under way: acked alone */
    size_t from = at(a, i), to = at(a, kept);
    if (a->state[from] == DONE) {
      if (conn_queue_ack(c, a->tags[from], 0)) return -1;
      continue;
    }
    a->tags[to] = a->tags[from];
    a->state[to] = a->state[from];
    kept++;
  }
  a->count = kept;
  a->done = 0;
  if (!a->count && a->cap > 1024) release(a);  /* a burst's ring goes back */
  return 0;
}

/* A connection was lost: its tags mean nothing on the next one (the broker requeued them). */
void acks_clear(struct rpc_acks *a) {
  a->head = a->count = a->done = 0;
  a->untracked = 0;
}

void acks_free(struct rpc_acks *a) {
  release(a);
  acks_clear(a);
}
