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

.PHONY: all deps test demo bench bench-million soak check memcheck broker-start broker-stop clean

all: $(MODULE)

$(MODULE): $(SRC) csrc/rpc.h
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS) $(LIBFLAG) -o $@ $(SRC) $(LIBS)

deps:
	@scripts/deps.sh

broker-start: deps
	@$(BROKER) start

broker-stop:
	@$(BROKER) stop

test: deps $(MODULE) broker-start
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
	rm -rf build bench/out
