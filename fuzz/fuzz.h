/* Shared by the libFuzzer targets in fuzz/: reading the fuzz input, and failing loudly. */
#ifndef RPC_FUZZ_H
#define RPC_FUZZ_H

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* A broken property is a crash: libFuzzer saves the input. */
#define FUZZ_CHECK(cond, what)                                                  \
  do {                                                                          \
    if (!(cond)) {                                                              \
      fprintf(stderr, "%s:%d: property broken: %s\n", __FILE__, __LINE__, what); \
      abort();                                                                  \
    }                                                                           \
  } while (0)

struct fuzz_input {
  const uint8_t *p;
  size_t len;
};

/* Past the end, every read gives zeros: the input's tail is never wasted on "too short". */
static inline uint8_t fuzz_byte(struct fuzz_input *in) {
  if (!in->len) return 0;
  in->len--;
  return *in->p++;
}

static inline uint16_t fuzz_u16(struct fuzz_input *in) {
  uint16_t hi = fuzz_byte(in);
  return (uint16_t)(hi << 8 | fuzz_byte(in));
}

static inline uint64_t fuzz_u64(struct fuzz_input *in) {
  uint64_t v = 0;
  for (int i = 0; i < 8; i++) v = v << 8 | fuzz_byte(in);
  return v;
}

/* Up to max bytes of the input, taken as they are; *len says how many. */
static inline const char *fuzz_bytes(struct fuzz_input *in, size_t max, size_t *len) {
  const char *s = (const char *)in->p;
  *len = max < in->len ? max : in->len;
  in->p += *len;
  in->len -= *len;
  return s;
}

#endif
