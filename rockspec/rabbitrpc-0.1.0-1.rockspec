rockspec_format = "3.0"
package = "rabbitrpc"
version = "0.1.0-1"
source = {
  url = "git+https://github.com/rabbitrpc/rabbitrpc.git",
  tag = "v0.1.0",
}
description = {
  summary = "RabbitMQ request-reply (RPC) clients and servers for Lua 5.4, with a C core",
  detailed = [[
rpc.client(queue):call(body, timeout) and rpc.serve(queue, handler), over rabbitmq-c and
libuuid: correlation ids, reply queues, timeouts, acks and the wait loop stay in C. Installs the
rabbitrpc command (call and serve from the shell) and rabbitrpc-broker (a private test broker
from Debian's rabbitmq-server).
]],
  homepage = "https://github.com/rabbitrpc/rabbitrpc",
  issues_url = "https://github.com/rabbitrpc/rabbitrpc/issues",
  maintainer = "The rabbitrpc authors",
  license = "MIT",
  labels = { "rabbitmq", "amqp", "rpc", "messaging" },
}
-- argparse is for the rabbitrpc command only. LuaRocks does not see Debian's packages: with
-- Debian's lua-argparse installed and no network, add --deps-mode=none to luarocks make.
dependencies = {
  "lua >= 5.4, < 5.5",
  "argparse >= 0.6",
}
external_dependencies = {
  -- No header test for rabbitmq-c: 0.11 has amqp.h, 0.12 and later rabbitmq-c/amqp.h (their
  -- amqp.h is a deprecated shim); csrc/rpc.h picks one. RABBITMQ_INCDIR is <prefix>/include.
  RABBITMQ = { library = "rabbitmq" },
  UUID = { header = "uuid/uuid.h", library = "uuid" },
  OPENSSL = { header = "openssl/ssl.h", library = "ssl" },  -- rabbitmq-c's TLS: verify details
}
build = {
  type = "builtin",
  modules = {
    rpc = "lua/rpc.lua",
    ["rpc.cli"] = "lua/rpc/cli.lua",
    ["rpc.cqueues"] = "lua/rpc/cqueues.lua",  -- needs lua-cqueues, only when required
    ["rpc.core"] = {
      sources = {
        "csrc/core.c", "csrc/options.c", "csrc/connection.c", "csrc/table.c",
        "csrc/pending.c", "csrc/loop.c", "csrc/client.c", "csrc/server.c", "csrc/messaging.c",
        "csrc/codec.c", "csrc/frames.c", "csrc/acks.c", "csrc/ids.c", "csrc/trace.c",
        "csrc/histogram.c",
      },
      libraries = { "rabbitmq", "uuid", "ssl", "crypto", "m" },
      incdirs = { "$(RABBITMQ_INCDIR)", "$(UUID_INCDIR)", "$(OPENSSL_INCDIR)" },
      libdirs = { "$(RABBITMQ_LIBDIR)", "$(UUID_LIBDIR)", "$(OPENSSL_LIBDIR)" },
      defines = {},
    },
  },
  copy_directories = { "types" },  -- LuaLS definitions (README "Editor support")
  install = {
    bin = {
      rabbitrpc = "bin/rabbitrpc",
      ["rabbitrpc-broker"] = "scripts/broker.sh",  -- needs Debian's rabbitmq-server
    },
  },
}
