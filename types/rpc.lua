---@meta rpc
-- LuaLS definitions for rabbitrpc's `rpc` module (types only: never loaded at run time).
-- Point LuaLS at this folder: "workspace.library": ["<checkout or rock dir>/types"]
-- (README.md, "Editor support"). spec/meta_spec.lua checks that every function and method of
-- the real objects is declared here, and that every error kind the C core returns is in
-- rpc.ErrorKind.

---The `kind` of a runtime failure (the third value of `nil, message, kind`); README.md "Error kinds".
---@alias rpc.ErrorKind
---| "timeout"     # no reply within the timeout (the request may still be handled later)
---| "no_route"    # nothing is bound to the routing key, or the exchange does not exist
---| "remote"      # the server's handler raised; message is its error text
---| "connection"  # the TCP connection was refused or lost
---| "auth"        # login refused, or no access to the vhost or a resource
---| "broker"      # the broker refused an operation (406 PRECONDITION_FAILED, 403 in use...)
---| "blocked"     # a resource alarm on the broker blocks publishing
---| "tls"         # the TLS handshake or the certificate verification failed
---| "too_large"   # a body over max_body, or request headers over the server's caps
---| "closed"      # the client, server or connection was closed
---| "stale"       # rpc.connect: ack/nack/reject of a tag from a connection lost since
---| "interrupted" # Ctrl-C (or a signal run() caught) while waiting
---| "codec"       # a body the codec could not encode or decode
---| "poisoned"    # the request was delivered more than the server's max_deliveries times: rejected unhandled

---Header tables: string keys; string, integer, float or boolean values (nested tables may
---arrive from other publishers).
---@alias rpc.Headers table<string, string|integer|number|boolean|table>

---@class rpc.TlsOptions
---@field ca? string PEM file of the CA to verify the broker against (default: the system's store)
---@field cert? string PEM client certificate (with `key`)
---@field key? string PEM private key of `cert`
---@field verify? boolean default true; false accepts any certificate (unsafe)
---@field verify_hostname? boolean default true; false accepts a certificate for another name (unsafe)

---A codec: the bodies of calls and replies are Lua values, encoded on the way out and decoded
---on the way in. `"json"` is the built-in one.
---@class rpc.Codec
---@field encode fun(value: any): string
---@field decode fun(body: string): any
---@field content_type string the content_type requests and replies are published with

---Options every connecting constructor takes (rpc.client, rpc.server, rpc.serve, rpc.connect).
---@class rpc.ConnectOptions
---@field url? string `amqp://user:password@host:port/vhost` or `amqps://...` (default: env RPC_URL, else `amqp://guest:guest@localhost:5672/`)
---@field urls? string[] instead of url: brokers tried in order, then round robin on reconnects
---@field heartbeat? number seconds, default 60; 0 turns heartbeats off
---@field connect_timeout? number seconds, default 10
---@field tls? rpc.TlsOptions for amqps:// urls
---@field max_body? integer the largest body in bytes this side sends or accepts (at most 512 MiB)

---@class rpc.ClientOptions: rpc.ConnectOptions
---@field timeout? number default call timeout in seconds (30)
---@field reply_to? "direct"|"exclusive"|string reply mode (default "direct"); any other string is a named durable reply queue
---@field confirm? boolean publisher confirms: a request the broker refuses fails at once with "broker"
---@field exchange? string publish requests through this exchange, with the queue as routing key
---@field codec? "json"|rpc.Codec bodies are Lua values, encoded and decoded by it
---@field trace? boolean requests made outside a traced handler start a W3C trace (a traceparent header)
---@field retries? integer 0-100, default 0: client:call sends a request again, within its timeout, when it provably reached no handler (no_route, a basic.nack, blocked, a connection lost before the publish); never after a timeout or a handler's error. call only (README "Safe retries")

---A binding of the server's queue (opts.bind).
---@class rpc.Binding
---@field exchange string
---@field routing_key? string default: the queue's name
---@field type? "direct"|"fanout"|"topic"|"headers" given: the exchange is declared
---@field durable? boolean for the declared exchange

---@class rpc.ServerOptions: rpc.ConnectOptions
---@field durable? boolean queue flag (false)
---@field exclusive? boolean queue flag (false)
---@field auto_delete? boolean queue flag (false)
---@field arguments? table<string, string|integer|number|boolean> queue arguments, e.g. `{["x-queue-type"] = "quorum"}`
---@field prefetch? integer requests the broker may send ahead, and handlers run at once (1)
---@field log? fun(line: string) told of lost connections, reconnects, refused reply_to and poisoned requests
---@field reply_to_allow? string|string[] queue names or Lua patterns (anchored) the server may reply to
---@field bind? rpc.Binding|rpc.Binding[] bindings of the queue, redone on every reconnect
---@field codec? "json"|rpc.Codec the handler gets decoded values; its returns are encoded
---@field max_deliveries? integer a request delivered more times is rejected unhandled, kind "poisoned" (3; 0: off)

---What every request takes: the options common to client:call, client:call_all and client:send.
---@class rpc.RequestOptions
---@field content_type? string
---@field headers? rpc.Headers
---@field persistent? boolean
---@field priority? integer 0-255
---@field exchange? string publish through this exchange
---@field routing_key? string default: the client's queue
---@field properties? boolean true: call and wait return `reply, props` (rpc.ReplyProperties)

---Per-request options of client:call and client:call_all.
---@class rpc.CallOptions: rpc.RequestOptions
---@field retries? integer 0-100, call only (a bad argument for call_all): this call's retries, instead of the client's `retries`

---client:send's options: rpc.RequestOptions and its timeout.
---@class rpc.SendOptions: rpc.RequestOptions
---@field timeout? number the request's expiration and the default deadline of its wait, seconds

---The properties of a reply: returned by call and wait with `callopts.properties = true`, and
---returned by a handler as its second value.
---@class rpc.ReplyProperties
---@field content_type? string
---@field headers? rpc.Headers

---What a handler gets as its second argument (built only when it declares one).
---@class rpc.Request
---@field correlation_id? string
---@field reply_to? string
---@field content_type? string
---@field headers? rpc.Headers
---@field redelivered boolean true: the request was delivered before (maybe handled), also for the copy a classic queue's redelivery becomes
---@field routing_key string
---@field exchange string
---@field deadline? number when the caller gives up: seconds since the epoch (os.time's clock, with fractions)

---A server's handler: returns the reply (a string or number; with a codec, any value), and
---optionally the reply's properties. A second value is properties only when it is a table (one
---with other keys or bad values is an error reply); any other (`return body:gsub(...)`'s count)
---is ignored. A raise is an error reply (kind "remote" for the caller).
---@alias rpc.Handler fun(body: any, request: rpc.Request): any, rpc.ReplyProperties|any

---Figures of a fixed log-bucket histogram (README "Latency figures"), in seconds: each
---percentile within about 4.5 % of the true one and never above max; all 0 while count is 0.
---@class rpc.Latency
---@field count integer values recorded
---@field p50 number
---@field p90 number
---@field p99 number
---@field max number the largest, exact

---@class rpc.ClientStats
---@field calls integer
---@field replies integer
---@field timeouts integer
---@field remote_errors integer
---@field no_route integer
---@field discarded integer late, duplicate or foreign replies thrown away
---@field codec_errors integer replies opts.codec could not decode (the call got kind "codec")
---@field retries integer attempts client:call made after a first one (opts.retries, callopts.retries)
---@field latency rpc.Latency publish to arrival of every reply that is not an error (send's too)

---@class rpc.ServerStats
---@field requests integer
---@field replies integer
---@field errors integer
---@field no_reply_to integer
---@field refused_reply_to integer
---@field too_large integer
---@field reconnects integer
---@field codec_errors integer requests opts.codec could not decode, answered with kind "codec" (not in errors)
---@field expired integer requests skipped unhandled: their deadline had passed (acked, no reply)
---@field poisoned integer requests rejected unhandled after max_deliveries deliveries (kind "poisoned")
---@field in_progress integer handlers under way
---@field handler_time rpc.Latency run times of the handlers that ran (success or error): x-rpc-handler-time
---@field connected boolean
---@field last_error? string the latest handler error, with its traceback

local rpc = {}

---"rabbitrpc 0.1.0": csrc/rpc.h's RPC_VERSION, the rockspecs' version
---@type string
rpc._VERSION = "rabbitrpc 0.1.0"

---Connects and sets up the reply path. `queue` is the routing key requests are published with.
---@param queue string
---@param opts? rpc.ClientOptions
---@return rpc.Client? client
---@return string? message
---@return rpc.ErrorKind? kind
function rpc.client(queue, opts) end

---Declares `queue` ("" : the broker names it), sets the prefetch and consumes with manual acks.
---@param queue string
---@param handler rpc.Handler
---@param opts? rpc.ServerOptions
---@return rpc.Server? server
---@return string? message
---@return rpc.ErrorKind? kind
function rpc.server(queue, handler, opts) end

---rpc.server, run, close: serves until Ctrl-C or SIGTERM, then returns true.
---@param queue string
---@param handler rpc.Handler
---@param opts? rpc.ServerOptions
---@return true? ok
---@return string? message
---@return rpc.ErrorKind? kind
function rpc.serve(queue, handler, opts) end

---A connection for the plain RabbitMQ patterns (publish, declare, bind, consume, receive, ack).
---@param opts? rpc.ConnectOptions
---@return rpc.Connection? conn
---@return string? message
---@return rpc.ErrorKind? kind
function rpc.connect(opts) end

---In a handler, suspends only its request; elsewhere, waits while the state's servers serve.
---@param seconds number 0 to 1e6
---@return true? ok
---@return string? message
---@return "interrupted"? kind
function rpc.sleep(seconds) end

---A monotonic clock: seconds (a float) since an arbitrary point, for deadlines and timing.
---@return number seconds
function rpc.now() end

---Seconds left before the deadline of the request whose handler calls it (0 once past); nil
---outside a handler, or for a request that came without a deadline.
---@return number? seconds
function rpc.remaining() end

-- ---- rpc.client ----

---@class rpc.Client
local Client = {}

---Publishes `body` and waits for its reply, at most `timeout` seconds (default: the client's).
---Without a codec, body is a string (any bytes) or a number and the reply a string; with one,
---any value both ways. With `callopts.properties`, the second value is the reply's properties.
---@param body any
---@param timeout? number seconds
---@param callopts? rpc.CallOptions
---@return any reply nil on failure
---@return string|rpc.ReplyProperties|nil message the failure's message (or the properties)
---@return rpc.ErrorKind? kind
function Client:call(body, timeout, callopts) end

---Publishes and returns at once with the request's id, for client:wait. While replies the
---caller has not waited for yet are in hand, the request is queued and written with the next
---wait (or client:flush, any turn of the loop, close): sends between two reads share a write.
---@param body any
---@param callopts? rpc.SendOptions
---@return string? id
---@return string? message
---@return rpc.ErrorKind? kind
function Client:send(body, callopts) end

---The reply to a send, waiting at most `timeout` seconds from now (default: the send's deadline).
---@param id string
---@param timeout? number
---@return any reply nil on failure
---@return string|rpc.ReplyProperties|nil message the failure's message (or the properties, when the send asked for them)
---@return rpc.ErrorKind? kind
function Client:wait(id, timeout) end

---Sends every body at once; the replies in the same order, all or nothing.
---@param bodies any[]
---@param timeout? number
---@param callopts? rpc.CallOptions
---@return any[]? replies
---@return string? message "request i of n: ..."
---@return rpc.ErrorKind? kind
function Client:call_all(bodies, timeout, callopts) end

---@return rpc.ClientStats counters
function Client:stats() end

---Writes the requests send queued (see client:send) now.
---@return true? ok
---@return string? message
---@return rpc.ErrorKind? kind
function Client:flush() end

---Idempotent; later calls return nil, "client closed", "closed".
function Client:close() end

---The Lua state's epoll descriptor (readable when any of its sockets has input).
---@return integer? fd
---@return string? message
---@return "closed"? kind
function Client:pollfd() end

---@return "r"? events
---@return string? message
---@return "closed"? kind
function Client:events() end

---Seconds until the state has work due without input (0: now; nil: none).
---@return number? seconds
---@return string? message
---@return "closed"? kind
function Client:timeout() end

---Does what the state has ready, never waiting for input.
---@return true? ok
---@return string? message
---@return "closed"? kind
function Client:step() end

---"rpc.client (amqp://user@host:port/vhost, queue 'q', reply_to direct)" (never the password).
---@return string
function Client:__tostring() end

---`local client <close> = ...` closes it.
function Client:__close() end

-- ---- rpc.server ----

---@class rpc.Server
local Server = {}

---Serves every open server of the state until server:stop(), SIGINT or SIGTERM; then true.
---@return true? ok
---@return string? message
---@return rpc.ErrorKind? kind
function Server:run() end

---Waits up to `timeout` seconds (default 0) for requests; how many this server handled.
---@param timeout? number
---@return integer? handled
---@return string? message
---@return rpc.ErrorKind? kind
function Server:poll(timeout) end

---run() returns after the step in hand.
function Server:stop() end

---Idempotent; unacked requests go back to the queue.
function Server:close() end

---@return rpc.ServerStats counters
function Server:stats() end

---@return integer? fd
---@return string? message
---@return "closed"? kind
function Server:pollfd() end

---@return "r"? events
---@return string? message
---@return "closed"? kind
function Server:events() end

---@return number? seconds
---@return string? message
---@return "closed"? kind
function Server:timeout() end

---@return true? ok
---@return string? message
---@return "closed"? kind
function Server:step() end

---"rpc.server (amqp://user@host:port/vhost, queue 'q', prefetch 1)" (never the password).
---@return string
function Server:__tostring() end

function Server:__close() end

-- ---- rpc.connect ----

---@class rpc.ExchangeOptions
---@field durable? boolean
---@field auto_delete? boolean
---@field internal? boolean
---@field passive? boolean
---@field arguments? table<string, string|integer|number|boolean>

---@class rpc.QueueOptions
---@field durable? boolean
---@field exclusive? boolean
---@field auto_delete? boolean
---@field passive? boolean
---@field arguments? table<string, string|integer|number|boolean> x-message-ttl, x-dead-letter-exchange, ...

---Properties of conn:publish.
---@class rpc.PublishProperties
---@field content_type? string
---@field content_encoding? string
---@field headers? rpc.Headers
---@field persistent? boolean
---@field priority? integer 0-255
---@field correlation_id? string
---@field reply_to? string
---@field expiration? string milliseconds, as text
---@field message_id? string
---@field timestamp? integer
---@field type? string
---@field user_id? string
---@field app_id? string

---@class rpc.ConsumeOptions
---@field ack? boolean true (default): you ack; false: acked on delivery
---@field prefetch? integer unacked deliveries at a time, for the connection
---@field exclusive? boolean
---@field tag? string the consumer tag (default: the broker's)

---@class rpc.DeleteQueueOptions
---@field if_unused? boolean
---@field if_empty? boolean

---@class rpc.DeleteExchangeOptions
---@field if_unused? boolean

---What conn:receive returns: a delivery, or (returned = true) a mandatory message that came back.
---@class rpc.Message
---@field body string
---@field delivery_tag? integer for ack, nack, reject (deliveries)
---@field redelivered? boolean
---@field exchange string
---@field routing_key string
---@field consumer_tag? string
---@field returned? true a mandatory publish nothing was bound for
---@field reply_code? integer with returned
---@field reply_text? string with returned
---@field content_type? string
---@field content_encoding? string
---@field delivery_mode? integer 2: persistent
---@field priority? integer
---@field correlation_id? string
---@field reply_to? string
---@field expiration? string
---@field message_id? string
---@field timestamp? integer
---@field type? string
---@field user_id? string
---@field app_id? string
---@field headers? rpc.Headers
---@field headers_too_large? true the headers were over the caps (16 levels, 1024 entries)

---@class rpc.Connection
local Connection = {}

---@param name string
---@param type "direct"|"fanout"|"topic"|"headers"
---@param opts? rpc.ExchangeOptions
---@return true? ok
---@return string? message
---@return rpc.ErrorKind? kind
function Connection:declare_exchange(name, type, opts) end

---No name (or ""): the broker names it.
---@param name? string
---@param opts? rpc.QueueOptions
---@return string? name
---@return integer|string|nil messages the message count (or the failure's message)
---@return integer|rpc.ErrorKind|nil consumers the consumer count (or the failure's kind)
function Connection:declare_queue(name, opts) end

---@param queue string
---@param exchange string
---@param routing_key? string
---@param arguments? table<string, string|integer|number|boolean> for headers exchanges: `{["x-match"] = "all", ...}`
---@return true? ok
---@return string? message
---@return rpc.ErrorKind? kind
function Connection:bind(queue, exchange, routing_key, arguments) end

---@param queue string
---@param exchange string
---@param routing_key? string
---@param arguments? table<string, string|integer|number|boolean>
---@return true? ok
---@return string? message
---@return rpc.ErrorKind? kind
function Connection:unbind(queue, exchange, routing_key, arguments) end

---@param exchange string "" : the default exchange
---@param routing_key string
---@param body string|number
---@param properties? rpc.PublishProperties
---@param mandatory? boolean an unroutable message comes back through receive (returned = true)
---@return true? ok
---@return string? message
---@return rpc.ErrorKind? kind
function Connection:publish(exchange, routing_key, body, properties, mandatory) end

---@param queue string
---@param opts? rpc.ConsumeOptions
---@return string? consumer_tag
---@return string? message
---@return rpc.ErrorKind? kind
function Connection:consume(queue, opts) end

---@param consumer_tag string
---@return true? ok
---@return string? message
---@return rpc.ErrorKind? kind
function Connection:cancel(consumer_tag) end

---The next delivery of any consumer, waiting up to `timeout` seconds (default: until one comes; 0: just look).
---@param timeout? number
---@return rpc.Message? msg
---@return string? message
---@return rpc.ErrorKind? kind
function Connection:receive(timeout) end

---@param delivery_tag integer
---@param multiple? boolean
---@return true? ok
---@return string? message
---@return rpc.ErrorKind? kind "stale": a tag from a connection lost since
function Connection:ack(delivery_tag, multiple) end

---@param delivery_tag integer
---@param multiple? boolean
---@param requeue? boolean default true
---@return true? ok
---@return string? message
---@return rpc.ErrorKind? kind
function Connection:nack(delivery_tag, multiple, requeue) end

---@param delivery_tag integer
---@param requeue? boolean default true
---@return true? ok
---@return string? message
---@return rpc.ErrorKind? kind
function Connection:reject(delivery_tag, requeue) end

---@param queue string
---@return integer? count messages purged
---@return string? message
---@return rpc.ErrorKind? kind
function Connection:purge(queue) end

---@param queue string
---@param opts? rpc.DeleteQueueOptions
---@return integer? count messages deleted with it
---@return string? message
---@return rpc.ErrorKind? kind
function Connection:delete_queue(queue, opts) end

---@param name string
---@param opts? rpc.DeleteExchangeOptions
---@return true? ok
---@return string? message
---@return rpc.ErrorKind? kind
function Connection:delete_exchange(name, opts) end

---Idempotent; unacked deliveries go back to their queues.
function Connection:close() end

---@return integer? fd
---@return string? message
---@return "closed"? kind
function Connection:pollfd() end

---@return "r"? events
---@return string? message
---@return "closed"? kind
function Connection:events() end

---@return number? seconds
---@return string? message
---@return "closed"? kind
function Connection:timeout() end

---@return true? ok
---@return string? message
---@return "closed"? kind
function Connection:step() end

---"rpc.connection (amqp://user@host:port/vhost)" (never the password).
---@return string
function Connection:__tostring() end

function Connection:__close() end

return rpc
