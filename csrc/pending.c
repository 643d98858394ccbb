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

static int hex_value(char c) {
  if (c >= '0' && c <= '9') return c - '0';
  if (c >= 'a' && c <= 'f') return c - 'a' + 10;
  if (c >= 'A' && c <= 'F') return c - 'A' + 10;
  return -1;
}

/* The 36-character text form of an id, as uuid_parse reads it, without its strtoul per byte:
 * every reply's correlation id goes through here. */
int pending_parse_id(const char *text, size_t len, unsigned char id[16]) {
  if (len != 36) return 0;
  size_t i = 0;
  for (int n = 0; n < 16; n++) {
    if (i == 8 || i == 13 || i == 18 || i == 23) {
      if (text[i++] != '-') return 0;
    }
    int high = hex_value(text[i]), low = hex_value(text[i + 1]);
    if (high < 0 || low < 0) return 0;
    id[n] = (unsigned char)(high << 4 | low);
    i += 2;
  }
  return 1;
}

void pending_free(struct rpc_pending *p) {
  free(p->slots);
  p->slots = NULL;
  p->cap = p->count = 0;
}
