/* Pending calls: an open-addressing table from correlation id (a random uuid, so its first
 * bytes are already a good hash) to the call's outcome. O(1) for any number in flight. */
#include <stdlib.h>
#include <string.h>

#include "rpc.h"

static size_t home_of(const struct rpc_pending *p, const unsigned char id[16]) {
  uint64_t h;
  memcpy(&h, id, sizeof h);
  return (size_t)h & (p->cap - 1);
}

static int grow(struct rpc_pending *p) {
  size_t cap = p->cap ? p->cap * 2 : 16;
  struct rpc_call *old = p->slots;
  size_t old_cap = p->cap;
  struct rpc_call *slots = calloc(cap, sizeof *slots);
  if (!slots) return -1;
  p->slots = slots;
  p->cap = cap;
  for (size_t i = 0; i < old_cap; i++) {
    if (!old[i].used) continue;
    size_t j = home_of(p, old[i].id);
    while (slots[j].used) j = (j + 1) & (cap - 1);
    slots[j] = old[i];
  }
  free(old);
  return 0;
}

struct rpc_call *pending_add(struct rpc_pending *p, const unsigned char id[16]) {
  if ((p->count + 1) * 2 > p->cap && grow(p)) return NULL;
  size_t i = home_of(p, id);
  while (p->slots[i].used) i = (i + 1) & (p->cap - 1);
  struct rpc_call *call = &p->slots[i];
  memset(call, 0, sizeof *call);
  memcpy(call->id, id, 16);
  call->used = 1;
  call->state = CALL_WAITING;
  call->ref = call->props_ref = LUA_NOREF;
  p->count++;
  return call;
}

struct rpc_call *pending_find(struct rpc_pending *p, const unsigned char id[16]) {
  if (!p->count) return NULL;
  for (size_t i = home_of(p, id); p->slots[i].used; i = (i + 1) & (p->cap - 1))
    if (memcmp(p->slots[i].id, id, 16) == 0) return &p->slots[i];
  return NULL;
}

/* Backward-shift deletion keeps every probe chain unbroken without tombstones. */
void pending_remove(struct rpc_pending *p, struct rpc_call *call) {
  size_t mask = p->cap - 1, hole = (size_t)(call - p->slots);
  call->used = 0;
  p->count--;
  for (size_t i = (hole + 1) & mask; p->slots[i].used; i = (i + 1) & mask) {
    size_t home = home_of(p, p->slots[i].id);
    /* move it back unless its home lies cyclically in (hole, i] */
    int stays = hole <= i ? (home > hole && home <= i) : (home > hole || home <= i);
    if (stays) continue;
    p->slots[hole] = p->slots[i];
    p->slots[i].used = 0;
    hole = i;
  }
}

/* Each byte's value as a hex digit, or -1 (any case, as uuid_parse reads it). */
#define HEX_ROW(base) base, base + 1, base + 2, base + 3, base + 4, base + 5, base + 6, base + 7, base + 8, base + 9
#define X16 -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1
static const signed char hex_values[256] = {
    X16, X16, X16, HEX_ROW(0), -1, -1, -1, -1, -1, -1,       /* '0'..'9' at 0x30 */
    -1, 10, 11, 12, 13, 14, 15, -1, -1, -1, -1, -1, -1, -1, -1, -1, X16,  /* 'A'..'F' */
    -1, 10, 11, 12, 13, 14, 15, -1, -1, -1, -1, -1, -1, -1, -1, -1, X16,  /* 'a'..'f' */
    X16, X16, X16, X16, X16, X16, X16, X16};

/* The 36-character text form of an id, as uuid_parse reads it, without its strtoul per byte:
 * every reply's correlation id and every wait's id go through here. */
int pending_parse_id(const char *text, size_t len, unsigned char id[16]) {
  static const unsigned char starts[16] = {0, 2, 4, 6, 9, 11, 14, 16, 19, 21, 24, 26, 28, 30, 32, 34};
  if (len != 36 || text[8] != '-' || text[13] != '-' || text[18] != '-' || text[23] != '-') return 0;
  int bad = 0;
  for (int n = 0; n < 16; n++) {
    int high = hex_values[(unsigned char)text[starts[n]]], low = hex_values[(unsigned char)text[starts[n] + 1]];
    bad |= high | low;  /* -1 has every bit */
    id[n] = (unsigned char)((unsigned)high << 4 | (unsigned)low);  /* a bad digit: reported below */
  }
  return bad >= 0;
}

void pending_free(struct rpc_pending *p) {
  free(p->slots);
  p->slots = NULL;
  p->cap = p->count = 0;
}
