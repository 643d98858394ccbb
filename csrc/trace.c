/* W3C Trace Context (https://www.w3.org/TR/trace-context/) over AMQP headers: a request's
 * traceparent is checked and its trace continued by the calls its handler makes, each under a
 * span id of its own. */
#include <string.h>

#include "rpc.h"

static int is_hex(const char *s, size_t n) {
  for (size_t i = 0; i < n; i++)
    if (!((s[i] >= '0' && s[i] <= '9') || (s[i] >= 'a' && s[i] <= 'f'))) return 0;
  return 1;
}

static int all_zeros(const char *s, size_t n) {
  for (size_t i = 0; i < n; i++)
    if (s[i] != '0') return 0;
  return 1;
}

/* version "-" trace-id "-" parent-id "-" flags: 2, 32, 16 and 2 lowercase hex digits; version
 * ff and all-zero ids are invalid; a later version may add fields after another "-". */
int trace_parse(struct rpc_context *ctx, const char *v, size_t len, struct rpc_ids *ids) {
  ctx->traced = 0;
  if (len < 55 || v[2] != '-' || v[35] != '-' || v[52] != '-') return 0;
  if (!is_hex(v, 2) || memcmp(v, "ff", 2) == 0) return 0;
  if (memcmp(v, "00", 2) == 0 ? len != 55 : len > 55 && v[55] != '-') return 0;
  if (!is_hex(v + 3, 32) || all_zeros(v + 3, 32) || !is_hex(v + 36, 16) || all_zeros(v + 36, 16) ||
      !is_hex(v + 53, 2))
    return 0;
  memcpy(ctx->trace_id, v + 3, 32);
  ctx->trace_id[32] = '\0';
  /* only the sampled bit passes on: vendors must zero the flags they do not know */
  int sampled = (v[54] >= 'a' ? v[54] - 'a' + 10 : v[54] - '0') & 1;
  memcpy(ctx->flags, sampled ? "01" : "00", 3);
  ids_hex(ids, ctx->span_id, 16);
  ctx->traced = 1;
  return 1;
}

void trace_child(const struct rpc_context *ctx, struct rpc_ids *ids, char out[56]) {
  char trace_id[33], span_id[17];
  if (ctx && ctx->traced) {  /* the handler's calls are children of its span: the reply names it */
    memcpy(trace_id, ctx->trace_id, sizeof trace_id);
    memcpy(span_id, ctx->span_id, sizeof span_id);
  } else {
    ids_hex(ids, trace_id, 32);
    ids_hex(ids, span_id, 16);
  }
  memcpy(out, "00-", 3);
  memcpy(out + 3, trace_id, 32);
  out[35] = '-';
  memcpy(out + 36, span_id, 16);
  out[52] = '-';
  memcpy(out + 53, ctx && ctx->traced ? ctx->flags : "01", 2);
  out[55] = '\0';
}
