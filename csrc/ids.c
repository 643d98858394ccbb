/* Correlation ids: random (version 4) uuids, as uuid_generate_random makes them, drawn from a
 * buffer of the kernel's randomness that one getrandom() call fills for 255 ids.
 * uuid_generate_random costs six system calls an id here (getrandom, getpid twice, gettid,
 * getuid, getppid): a fifth of a client's time per call. The ids stay unguessable to other
 * publishers (a forged reply must not match a call): every byte is the kernel's CSPRNG output,
 * used once. The buffer is a page of its own marked MADV_WIPEONFORK: a forked child finds it
 * empty and draws its own, rather than repeating its parent's ids. */
#define _DEFAULT_SOURCE  /* MADV_WIPEONFORK */
#include "rpc.h"

#include <string.h>
#include <sys/mman.h>
#include <sys/random.h>
#include <uuid/uuid.h>

#define PAGE 4096

struct rpc_ids {
  size_t used, filled;          /* zero in a forked child: the page is wiped */
  unsigned char bytes[PAGE - 2 * sizeof(size_t)];
};

/* NULL when the page cannot be had or wiped on fork: ids then come from libuuid. */
struct rpc_ids *ids_new(void) {
#ifdef MADV_WIPEONFORK
  void *page = mmap(NULL, PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (page == MAP_FAILED) return NULL;
  if (madvise(page, PAGE, MADV_WIPEONFORK) == 0) return page;
  munmap(page, PAGE);
#endif
  return NULL;
}

void ids_free(struct rpc_ids *ids) {
  if (ids) munmap(ids, PAGE);
}

static int refill(struct rpc_ids *ids) {
  size_t want = sizeof ids->bytes - sizeof ids->bytes % 16;
  ssize_t n = getrandom(ids->bytes, want, GRND_NONBLOCK);  /* not ready (early boot): libuuid */
  if (n < 16) return -1;
  ids->filled = (size_t)n - (size_t)n % 16;
  ids->used = 0;
  return 0;
}

/* 16 random bytes; 0 when they came from libuuid (a v4 uuid: 122 of them random). */
static int draw(struct rpc_ids *ids, unsigned char out[16]) {
  if (!ids || (ids->used == ids->filled && refill(ids))) {
    uuid_generate_random(out);
    return 0;
  }
  memcpy(out, ids->bytes + ids->used, 16);
  memset(ids->bytes + ids->used, 0, 16);  /* used once: an id leaves no copy behind */
  ids->used += 16;
  return 1;
}

void ids_next(struct rpc_ids *ids, unsigned char id[16]) {
  if (!draw(ids, id)) return;
  id[6] = (unsigned char)((id[6] & 0x0F) | 0x40);  /* version 4 */
  id[8] = (unsigned char)((id[8] & 0x3F) | 0x80);  /* RFC 4122 variant */
}

void ids_hex(struct rpc_ids *ids, char *out, size_t digits) {
  static const char hex[] = "0123456789abcdef";
  unsigned char id[16];
  for (size_t i = 0; i < digits; i++) {
    if (i % 32 == 0) draw(ids, id);
    unsigned char byte = id[i % 32 / 2];
    out[i] = hex[i % 2 ? byte & 15 : byte >> 4];
  }
  out[digits] = '\0';
}
