/* Latency histograms: counts in fixed log-spaced buckets, so that memory stays constant however
 * many values come, and recording is a little arithmetic on memory its owner already holds: no
 * allocation and no Lua, so it is safe anywhere (while a message is in hand, between a raise's
 * cause and its catch). Buckets grow by 2^(1/8) from 1 us to 2^30 us (about 1074 s), with one
 * below and one above. A percentile reads as its bucket's geometric middle, which is within
 * 2^(1/16) - 1 (4.4 %) of every value in the bucket, and never above the exact max: about
 * +/-4.5 % of the true figure. Under 1 us reads as 1 us; over the top, as max. */
#include <math.h>

#include "rpc.h"

#define HIST_MIN 1e-6       /* seconds: the lowest bucket's lower edge */
#define HIST_PER_OCTAVE 8   /* buckets per doubling: the ratio 2^(1/8) */
#define HIST_TOP (RPC_HISTOGRAM_BUCKETS - 1)  /* the bucket above the range */

/* 0: below HIST_MIN (or not a number); 1 to HIST_TOP - 1: [MIN * 2^((i-1)/8), MIN * 2^(i/8));
 * HIST_TOP: above. */
static int bucket_of(double seconds) {
  if (!(seconds >= HIST_MIN)) return 0;
  double i = floor(log2(seconds / HIST_MIN) * HIST_PER_OCTAVE) + 1;
  return i < HIST_TOP ? (int)i : HIST_TOP;
}

void histogram_record(struct rpc_histogram *h, double seconds) {
  h->buckets[bucket_of(seconds)]++;
  h->count++;
  if (seconds > h->max) h->max = seconds;
}

/* What bucket i reads as (see the top), before clamping to max. */
static double bucket_value(const struct rpc_histogram *h, int i) {
  if (i == 0) return HIST_MIN;
  if (i == HIST_TOP) return h->max;
  return HIST_MIN * exp2((i - 0.5) / HIST_PER_OCTAVE);
}

/* The nearest-rank p-th percentile: the bucket of the ceil(count * p / 100)-th smallest value.
 * 0 when empty. */
static double percentile(const struct rpc_histogram *h, unsigned p) {
  if (!h->count) return 0;
  uint64_t rank = h->count / 100 * p + (h->count % 100 * p + 99) / 100;  /* never overflows */
  uint64_t seen = h->buckets[0];
  int i = 0;
  while (seen < rank && i < HIST_TOP) seen += h->buckets[++i];
  double v = bucket_value(h, i);
  return v < h->max ? v : h->max;
}

static void set_seconds(lua_State *L, const char *name, double seconds) {
  lua_pushnumber(L, seconds);
  lua_setfield(L, -2, name);
}

/* The figures, into the table on top. */
static void set_figures(lua_State *L, const struct rpc_histogram *h) {
  rpc_set_count(L, "count", (lua_Integer)h->count);
  set_seconds(L, "p50", percentile(h, 50));
  set_seconds(L, "p90", percentile(h, 90));
  set_seconds(L, "p99", percentile(h, 99));
  set_seconds(L, "max", h->max);
}

void histogram_push(lua_State *L, const struct rpc_histogram *h) {
  lua_createtable(L, 0, 5);
  set_figures(L, h);
}
