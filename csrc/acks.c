/* Batched acks: a server's deliveries in the order they came (on one channel their tags rise),
 * each marked done once its reply went out. acks_flush queues one basic.ack with multiple =
 * true for the done ones at the front, where the broker counts one ack where it counted many,
 * and single acks for the done ones behind a request still under way, so that a slow handler
 * never keeps the prefetch window shut. At-least-once: nothing is acked before it is done. */
#include "rpc.h"

#include <stdlib.h>

enum { UNDER_WAY, DONE, SENT };  /* SENT: acked alone, behind one under way */

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

/* The delivery was settled otherwise (rejected): no ack may name it. */
void acks_settled(struct rpc_acks *a, uint64_t tag) {
  size_t i = find(a, tag);
  if (i < a->count && a->state[at(a, i)] == UNDER_WAY) a->state[at(a, i)] = SENT;
}

/* Queues the acks for what is done on c; -1 when c was lost doing so. */
int acks_flush(struct rpc_acks *a, struct rpc_conn *c) {
  size_t n = 0, front = 0;
  uint64_t last = 0;
  int batch = !a->untracked;  /* an untracked delivery may be among the lower tags */
  for (; n < a->count && a->state[at(a, n)] != UNDER_WAY; n++) {
    if (a->state[at(a, n)] != DONE) continue;
    if (!batch && conn_queue_ack(c, a->tags[at(a, n)], 0)) return -1;
    last = a->tags[at(a, n)];
    front++;
  }
  if (batch && front && conn_queue_ack(c, last, front > 1)) return -1;
  a->head = at(a, n);
  a->count -= n;
  for (size_t i = 0; i < a->count; i++) {
    if (a->state[at(a, i)] != DONE) continue;
    if (conn_queue_ack(c, a->tags[at(a, i)], 0)) return -1;
    a->state[at(a, i)] = SENT;
  }
  a->done = 0;
  return 0;
}

/* A connection was lost: its tags mean nothing on the next one (the broker requeued them). */
void acks_clear(struct rpc_acks *a) {
  a->head = a->count = a->done = 0;
  a->untracked = 0;
}

void acks_free(struct rpc_acks *a) {
  free(a->tags);
  free(a->state);
  a->tags = NULL;
  a->state = NULL;
  a->cap = 0;
  acks_clear(a);
}
