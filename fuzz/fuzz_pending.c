/* libFuzzer target: the pending-call table (csrc/pending.c) against a reference model, and
 * pending_parse_id against libuuid's parser.
 *
 * The input is a list of operations. Ids come from a 16-bit seed whose bytes also decide the
 * id's home slot, so probe chains collide, wrap and shift back on removal. The model is a plain
 * array indexed by seed; after every operation the counts must agree, and every few operations
 * (and at the end) every id the model holds must be found, in a slot that says the same id and
 * the tag stored at its add. Never aborts for a well-behaved pending.c. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <uuid/uuid.h>

#include "../csrc/rpc.h"
#include "fuzz.h"

#define SEEDS 65536
#define MAX_LIVE 3000   /* enough for the table to grow to 8192 slots */

struct model {
  uint32_t tag[SEEDS];  /* 0: absent */
  uint16_t live[MAX_LIVE];
  uint16_t pos[SEEDS];
  size_t n;
};

static void id_of(uint16_t seed, unsigned char id[16]) {
  /* bytes 0-1 choose the home (low bits of a little-endian word); few distinct values in
   * byte 1 crowd the homes together. Bytes 8-9 keep every seed's id distinct. */
  memset(id, 0, 16);
  id[0] = (unsigned char)seed;
  id[1] = (unsigned char)(seed >> 8 & 3);
  id[8] = (unsigned char)seed;
  id[9] = (unsigned char)(seed >> 8);
  id[15] = 0xa5;
}

static void check_call(const struct rpc_call *call, uint16_t seed, uint32_t tag) {
  unsigned char id[16];
  id_of(seed, id);
  FUZZ_CHECK(call != NULL, "an added id is not found");
  FUZZ_CHECK(call->used, "found a slot not in use");
  FUZZ_CHECK(memcmp(call->id, id, 16) == 0, "found the wrong id");
  FUZZ_CHECK(call->seq == tag, "found a call with another call's data");
  FUZZ_CHECK(call->state == CALL_WAITING && call->ref == LUA_NOREF, "a new call is not fresh");
}

static void check_all(struct rpc_pending *p, const struct model *m) {
  FUZZ_CHECK(p->count == m->n, "count differs from the model");
  size_t used = 0;
  for (size_t i = 0; i < p->cap; i++) used += p->slots[i].used != 0;
  FUZZ_CHECK(used == p->count, "used slots differ from count");
  FUZZ_CHECK(p->cap == 0 || (p->cap & (p->cap - 1)) == 0, "capacity not a power of two");
  FUZZ_CHECK(p->count * 2 <= p->cap || p->cap == 0, "table more than half full");
  for (size_t k = 0; k < m->n; k++) {
    unsigned char id[16];
    uint16_t seed = m->live[k];
    id_of(seed, id);
    check_call(pending_find(p, id), seed, m->tag[seed]);
  }
}

static void add(struct rpc_pending *p, struct model *m, uint16_t seed, uint32_t *next_tag) {
  if (m->tag[seed] || m->n == MAX_LIVE) return;  /* ids are random uuids: never added twice */
  unsigned char id[16];
  id_of(seed, id);
  struct rpc_call *call = pending_add(p, id);
  FUZZ_CHECK(call != NULL, "pending_add failed");
  call->seq = ++*next_tag;
  m->tag[seed] = *next_tag;
  m->pos[seed] = (uint16_t)m->n;
  m->live[m->n++] = seed;
  check_call(pending_find(p, id), seed, m->tag[seed]);
}

static void find(struct rpc_pending *p, const struct model *m, uint16_t seed) {
  unsigned char id[16];
  id_of(seed, id);
  struct rpc_call *call = pending_find(p, id);
  if (m->tag[seed]) check_call(call, seed, m->tag[seed]);
  else FUZZ_CHECK(call == NULL, "found an id never added or already removed");
}

static void remove_seed(struct rpc_pending *p, struct model *m, uint16_t seed) {
  unsigned char id[16];
  id_of(seed, id);
  struct rpc_call *call = pending_find(p, id);
  if (!m->tag[seed]) {
    FUZZ_CHECK(call == NULL, "found an id never added or already removed");
    return;
  }
  check_call(call, seed, m->tag[seed]);
  pending_remove(p, call);
  m->tag[seed] = 0;
  uint16_t last = m->live[--m->n];
  m->live[m->pos[seed]] = last;
  m->pos[last] = m->pos[seed];
  FUZZ_CHECK(pending_find(p, id) == NULL, "a removed id is still found");
}

/* The reference: libuuid's own parser of the 36-character form. */
static void parse(struct fuzz_input *in) {
  uint8_t how = fuzz_byte(in);
  char text[64];
  size_t len;
  if (how < 96) {  /* a real id's text, perhaps with one byte changed */
    uuid_t u;
    for (int i = 0; i < 16; i++) u[i] = fuzz_byte(in);
    if (how & 1) uuid_unparse_upper(u, text);
    else uuid_unparse_lower(u, text);
    len = 36;
    if (how & 2) text[fuzz_byte(in) % 36] = (char)fuzz_byte(in);
    if (!(how & 6)) {
      unsigned char id[16];
      FUZZ_CHECK(pending_parse_id(text, len, id) && memcmp(id, u, 16) == 0,
                 "pending_parse_id misreads uuid_unparse's text");
    }
  } else {  /* any bytes, any length up to 64 */
    len = fuzz_byte(in) % 65;
    for (size_t i = 0; i < len; i++) text[i] = (char)fuzz_byte(in);
  }
  /* exactly len bytes, so ASan sees any read past them */
  char *exact = malloc(len ? len : 1);
  FUZZ_CHECK(exact != NULL, "out of memory");
  memcpy(exact, text, len);
  unsigned char id[16], ref[16];
  memset(id, 0x5a, sizeof id);
  int ok = pending_parse_id(exact, len, id);
  int ref_ok = uuid_parse_range(exact, exact + len, ref) == 0;
  FUZZ_CHECK(ok == 0 || ok == 1, "pending_parse_id returns neither 0 nor 1");
  FUZZ_CHECK(ok == ref_ok, "pending_parse_id and uuid_parse_range disagree on what is an id");
  if (ok) FUZZ_CHECK(memcmp(id, ref, 16) == 0, "pending_parse_id and uuid_parse_range read different ids");
  free(exact);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  static struct model m;  /* 400 KB: not on the stack; cleared below */
  struct fuzz_input in = {data, size};
  struct rpc_pending p = {NULL, 0, 0};
  uint32_t next_tag = 0;
  for (size_t k = 0; k < m.n; k++) m.tag[m.live[k]] = 0;
  m.n = 0;
  for (unsigned ops = 0; in.len; ops++) {
    uint8_t op = fuzz_byte(&in);
    uint16_t seed = fuzz_u16(&in);
    switch (op % 8) {
      case 0: case 1: case 2: add(&p, &m, seed, &next_tag); break;
      case 3: find(&p, &m, seed); break;
      case 4: case 5: remove_seed(&p, &m, seed); break;
      case 6: {  /* a burst of adds with neighbouring seeds: grows the table */
        unsigned n = fuzz_byte(&in);
        for (unsigned i = 0; i < n; i++) add(&p, &m, (uint16_t)(seed + i * (op >> 3 | 1)), &next_tag);
        break;
      }
      default: parse(&in); break;
    }
    FUZZ_CHECK(p.count == m.n, "count differs from the model");
    if (ops % 64 == 63) check_all(&p, &m);
  }
  check_all(&p, &m);
  /* remove everything, oldest seed first, checking the rest each time a few are gone */
  while (m.n) {
    remove_seed(&p, &m, m.live[0]);
    if (m.n % 128 == 0) check_all(&p, &m);
  }
  FUZZ_CHECK(p.count == 0, "not empty after removing every id");
  pending_free(&p);
  return 0;
}
