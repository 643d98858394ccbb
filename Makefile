# rabbitrpc: build, test, demo. Paths and tools are variables; the module never links -llua.
CC ?= cc
LUA ?= lua5.4
LUA_INCDIR ?= /usr/include/lua5.4
RABBITMQ_INCDIR ?= /usr/include
UUID_INCDIR ?= /usr/include
WARN = -Wall -Wextra -Wshadow -Wconversion -Wno-sign-conversion -Wpointer-arith -Wwrite-strings \
       -Wmissing-prototypes -Wstrict-prototypes
CFLAGS ?= -O2 -g
CFLAGS += -std=c99 -fPIC $(WARN) -I$(LUA_INCDIR) -I$(RABBITMQ_INCDIR) -I$(UUID_INCDIR)
LIBFLAG ?= -shared
LIBS = -lrabbitmq -luuid -lssl -lcrypto -lm

BROKER = scripts/broker.sh
BROKER_PORT ?= 5673
export RPC_URL ?= amqp://guest:guest@localhost:$(BROKER_PORT)/
export RPC_BROKER_PORT := $(BROKER_PORT)
BUSTED = $(LUA) /usr/bin/busted

SRC = $(wildcard csrc/*.c)
MODULE = build/rpc/core.so
# test-only (spec/support/oom.c, spec/raise_spec.lua): makes chosen allocations fail
OOM_MODULE = build/test/oom.so

.PHONY: all deps test demo bench bench-million soak check memcheck broker-start broker-stop clean \
        fuzz fuzz-deps sanitize rock

all: $(MODULE)

$(MODULE): $(SRC) csrc/rpc.h
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS) $(LIBFLAG) -o $@ $(SRC) $(LIBS)

$(OOM_MODULE): spec/support/oom.c
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS) $(LIBFLAG) -o $@ spec/support/oom.c

deps:
	@scripts/deps.sh

broker-start: deps
	@$(BROKER) start

broker-stop:
	@$(BROKER) stop

test: deps $(MODULE) $(OOM_MODULE) broker-start
	$(BUSTED) $(BUSTED_ARGS)

demo: deps $(MODULE) broker-start
	@scripts/demo.sh

bench: deps all broker-start
	@bench/run.sh $(BENCH_ARGS)

bench-million: deps all broker-start
	@bench/run.sh --million $(BENCH_MILLION)

soak: deps all broker-start
	@$(LUA) scripts/soak.lua $(SOAK_ARGS)

check: $(SRC)
	$(CC) $(CFLAGS) -fsyntax-only $(SRC)
	cppcheck --quiet --error-exitcode=1 --enable=warning,performance,portability --inline-suppr \
	  --suppress=missingIncludeSystem -I csrc csrc

memcheck: deps $(MODULE) broker-start
	@scripts/memcheck.sh

clean:
	rm -rf build build-asan bench/out

# A source rock, build/rock/rabbitrpc-scm-1.src.rock, offline: luarocks pack clones the rockspec's
# url, and git is told to clone this checkout instead (its committed HEAD; for a versioned
# rockspec, its tag: make rock ROCKSPEC=rockspec/rabbitrpc-0.1.0-1.rockspec once v0.1.0 exists).
ROCKSPEC ?= rockspec/rabbitrpc-scm-1.rockspec
ROCK_URL = https://github.com/rabbitrpc/rabbitrpc.git
rock:
	@mkdir -p build/rock
	cd build/rock && GIT_CONFIG_COUNT=1 GIT_CONFIG_KEY_0='url.file://$(CURDIR).insteadOf' \
	  GIT_CONFIG_VALUE_0='$(ROCK_URL)' luarocks --lua-version=5.4 pack '$(CURDIR)/$(ROCKSPEC)'

# ---- fuzzing (fuzz/README.md): libFuzzer targets for the pure-C parts ----
FUZZ_CC ?= clang-14
FUZZ_SECONDS ?= 60
FUZZ_CFLAGS = -g -O1 -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=all -Wall -Wextra \
              -I$(LUA_INCDIR) -I$(RABBITMQ_INCDIR) -I$(UUID_INCDIR)
# the targets are programs, not the module: they link Lua
FUZZ_LIBS = -llua5.4 -lrabbitmq -luuid -lssl -lcrypto -lm
FUZZ_TARGETS = pending table_push table_from_lua conn_init
FUZZ_SRC_pending = csrc/pending.c
FUZZ_SRC_table_push = csrc/table.c
FUZZ_SRC_table_from_lua = csrc/table.c
# connection.c needs core.c, and core.c every concept
FUZZ_SRC_conn_init = $(SRC)
FUZZ_BINS = $(FUZZ_TARGETS:%=build/fuzz/fuzz_%)

fuzz-deps:
	@scripts/deps.sh clang-14 libclang-rt-14-dev python3

$(FUZZ_BINS): build/fuzz/fuzz_%: fuzz/fuzz_%.c fuzz/fuzz.h $(SRC) csrc/rpc.h
	@mkdir -p $(dir $@)
	$(FUZZ_CC) $(FUZZ_CFLAGS) -o $@ $< $(FUZZ_SRC_$*) $(FUZZ_LIBS)

# Each target runs FUZZ_SECONDS on its corpus (build/fuzz/corpus/T, kept between runs) and the
# seeds; any crash, leak, sanitizer report or broken property fails, its input kept as
# build/fuzz/T-crash-* (replay: build/fuzz/fuzz_T FILE).
fuzz: fuzz-deps $(FUZZ_BINS)
	@rm -rf build/fuzz/seeds && python3 fuzz/seeds.py build/fuzz/seeds
	@for t in $(FUZZ_TARGETS); do \
	  mkdir -p build/fuzz/corpus/$$t; \
	  echo "fuzz: $$t for $(FUZZ_SECONDS) s (log: build/fuzz/$$t.log)"; \
	  if ! build/fuzz/fuzz_$$t -max_total_time=$(FUZZ_SECONDS) -timeout=10 -print_final_stats=1 \
	      -artifact_prefix=build/fuzz/$$t- $(FUZZ_ARGS) build/fuzz/corpus/$$t build/fuzz/seeds/$$t \
	      > build/fuzz/$$t.log 2>&1; then \
	    grep -v '^"' build/fuzz/$$t.log | tail -n 40; \
	    echo "fuzz: $$t FAILED; the input: $$(ls build/fuzz/$$t-* 2>/dev/null | tr '\n' ' ')"; exit 1; \
	  fi; \
	  grep -E '^#[0-9]+[[:space:]]+DONE' build/fuzz/$$t.log | sed "s/^/fuzz: $$t: /"; \
	  grep -E '^stat::(number_of_executed_units|average_exec_per_sec|peak_rss_mb)' build/fuzz/$$t.log | \
	    sed "s/^/fuzz: $$t: /"; \
	done

# ---- the spec suite against an ASan/UBSan build of the module ----
# lua5.4 is not instrumented: gcc's ASan runtime is preloaded into busted and, through
# RPC_SPEC_PRELOAD (spec/support/helpers.lua), into the Lua children the specs start; other
# children (python3, rabbitmqctl, the Erlang nodes of tls_spec, which do not boot under ASan)
# run without it. Reports go to build-asan/log/ (children's too, whose stderr nobody reads); any
# report fails the run. Leaks are not checked here (lua5.4 and busted's own libraries are not
# ours to judge): make memcheck (valgrind) and make fuzz (LSan) check the module's. The RSS
# spec is skipped: ASan's quarantine holds freed memory on purpose.
SANITIZE_CC ?= gcc
SANITIZE_FLAGS = -O1 -g -fsanitize=address,undefined -fno-omit-frame-pointer
ASAN_MODULE = build-asan/rpc/core.so
ASAN_RUNTIME = $(shell $(SANITIZE_CC) -print-file-name=libasan.so)
SANITIZE_SKIP ?= --filter-out='keeps RSS flat'
SANITIZE_ENV = LD_PRELOAD=$(ASAN_RUNTIME) RPC_SPEC_PRELOAD=$(ASAN_RUNTIME) RPC_SPEC_BUILD=build-asan \
  ASAN_OPTIONS=detect_leaks=0:abort_on_error=0:log_path=$(CURDIR)/build-asan/log/asan \
  UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1:log_path=$(CURDIR)/build-asan/log/ubsan

$(ASAN_MODULE): $(SRC) csrc/rpc.h
	@mkdir -p $(dir $@)
	$(SANITIZE_CC) $(CFLAGS) $(SANITIZE_FLAGS) $(LIBFLAG) -o $@ $(SRC) $(LIBS)

sanitize: deps $(ASAN_MODULE) $(OOM_MODULE) broker-start
	@rm -rf build-asan/log && mkdir -p build-asan/log
	@status=0; env $(SANITIZE_ENV) $(BUSTED) --cpath='build-asan/?.so' $(SANITIZE_SKIP) $(BUSTED_ARGS) || status=$$?; \
	if [ -n "$$(ls build-asan/log)" ]; then \
	  for f in build-asan/log/*; do echo "== $$f"; cat "$$f"; done; \
	  echo "sanitize: sanitizer reports above (build-asan/log/)"; exit 1; \
	fi; \
	[ $$status = 0 ] || echo "sanitize: the spec suite failed (no sanitizer report)"; exit $$status
