rockspec_format = "3.0"
package = "rabbitrpc"
version = "scm-1"
source = {
  url = "git+file:///dev/null",  -- built from a checkout: luarocks make rockspec/rabbitrpc-scm-1.rockspec
}
description = {
  summary = "RabbitMQ request-reply (RPC) clients and servers for Lua 5.4, with a C core",
  detailed = [[
rpc.client(queue):call(body, timeout) and rpc.serve(queue, handler), over rabbitmq-c and
libuuid: correlation ids, reply queues, timeouts, acks and the wait loop stay in C.
]],
  license = "MIT",
}
dependencies = {
  "lua >= 5.4, < 5.5",
}
external_dependencies = {
  RABBITMQ = { header = "amqp.h", library = "rabbitmq" },
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
        "csrc/codec.c",
      },
      libraries = { "rabbitmq", "uuid", "ssl", "crypto", "m" },
      incdirs = { "$(RABBITMQ_INCDIR)", "$(UUID_INCDIR)", "$(OPENSSL_INCDIR)" },
      libdirs = { "$(RABBITMQ_LIBDIR)", "$(UUID_LIBDIR)", "$(OPENSSL_LIBDIR)" },
      defines = {},
    },
  },
  install = { bin = { rabbitrpc = "bin/rabbitrpc" } },  -- needs lua-argparse (and lua-system for --repeat)
}
