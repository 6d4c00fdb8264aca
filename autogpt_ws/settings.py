"""Every setting, declared once: key, kind, default, environment names,
one line of doc (``SECTIONS``), and :class:`Settings`, the frozen value the
loader (:mod:`autogpt_ws.config`) builds from them.  ``config.yaml`` and
the settings table of docs/operations.md are generated from these
declarations, and a test checks they agree."""

from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass
from typing import Any, Callable

DEFAULT_USER_ID = "3e53486c-cf57-477e-ba2a-cb02dc828e1a"

KiB = 1024
MiB = 1024 * KiB


# ---------------------------------------------------------------------------
# value converters: raw (str from env/CLI, or a YAML value) -> typed value


def _to_str(raw: Any) -> str:
    if raw is None:
        return ""
    if isinstance(raw, (dict, list)):
        raise ValueError("must be a string")
    return str(raw)


def _to_bool(raw: Any) -> bool:
    if isinstance(raw, bool):
        return raw
    text = str(raw).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"{raw!r} is not a boolean (use true or false)")


def _to_int(raw: Any) -> int:
    if isinstance(raw, bool):
        raise ValueError(f"{raw!r} is not an integer")
    if isinstance(raw, int):
        return raw
    try:
        return int(str(raw).strip())
    except ValueError:
        raise ValueError(f"{raw!r} is not an integer") from None


def _to_float(raw: Any) -> float:
    if isinstance(raw, bool):
        raise ValueError(f"{raw!r} is not a number")
    try:
        value = float(str(raw).strip()) if not isinstance(raw, (int, float)) else float(raw)
    except (ValueError, OverflowError):  # OverflowError: an integer too large for a float
        raise ValueError(f"{raw!r} is not a number") from None
    if not math.isfinite(value):  # nan passes every bound (nan < minimum is False); inf overflows timers
        raise ValueError(f"{raw!r} is not a finite number")
    return value


_SIZE = re.compile(r"^\s*(\d+)\s*([kmg]i?b?|b)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "k": KiB, "m": MiB, "g": 1024 * MiB}


def _to_size(raw: Any) -> int:
    """Bytes: an integer, or a number with K/KiB, M/MiB, G/GiB."""
    if isinstance(raw, int) and not isinstance(raw, bool):
        return raw
    match = _SIZE.match(str(raw))
    if not match:
        raise ValueError(f"{raw!r} is not a size in bytes (e.g. 65536, 64KiB, 1MiB)")
    unit = (match.group(2) or "").lower()[:1]
    return int(match.group(1)) * _UNITS[unit]


def _to_list(raw: Any) -> tuple[str, ...]:
    """A YAML list, a JSON list, or a comma-separated string."""
    if raw is None:
        return ()
    if isinstance(raw, (list, tuple)):
        items = list(raw)
    else:
        text = str(raw).strip()
        if text.startswith("["):
            try:
                items = json.loads(text)
            except ValueError:
                raise ValueError(f"{text!r} is not a JSON list") from None
            if not isinstance(items, list):
                raise ValueError(f"{text!r} is not a JSON list")
        else:
            items = [part for part in text.split(",")]
    out = []
    for item in items:
        if not isinstance(item, (str, int, float)) or isinstance(item, bool):
            raise ValueError(f"list item {item!r} is not a string")
        text = str(item).strip()
        if text:
            out.append(text)
    return tuple(out)


_CONVERT: dict[str, Callable[[Any], Any]] = {
    "str": _to_str,
    "bool": _to_bool,
    "int": _to_int,
    "float": _to_float,
    "size": _to_size,
    "list": _to_list,
}


@dataclass(frozen=True)
class Field:
    key: str
    kind: str
    default: Any
    env: tuple[str, ...]
    doc: str
    choices: tuple[str, ...] = ()
    minimum: float | None = None
    section: str = ""
    maximum: float | None = None


def _f(key: str, kind: str, default: Any, env: str | tuple[str, ...], doc: str,
       choices: tuple[str, ...] = (), minimum: float | None = None,
       maximum: float | None = None) -> Field:
    return Field(key, kind, default, (env,) if isinstance(env, str) else env, doc, choices, minimum,
                 maximum=maximum)


LOG_LEVELS = ("debug", "info", "warn", "error", "critical")
JWT_ALGORITHMS = (
    "HS256", "HS384", "HS512", "RS256", "RS384", "RS512", "ES256", "ES384", "ES512",
    "PS256", "PS384", "PS512", "EdDSA",
)

SECTIONS: tuple[tuple[str, tuple[Field, ...]], ...] = (
    ("Server", (
        _f("host", "str", "0.0.0.0", "WEBSOCKET_SERVER_HOST", "interface to bind"),
        _f("port", "int", 8001, "WEBSOCKET_SERVER_PORT", "TCP port for HTTP and the WebSocket (0: any free port)",
           minimum=0, maximum=65535),
        _f("listen", "str", "", "AUTOGPT_WS_LISTEN",
           "Twisted endpoint string (tcp:8001, ssl:8443:privateKey=k.pem:certKey=c.pem); overrides host and port"),
        _f("listen_backlog", "int", 4096, "AUTOGPT_WS_LISTEN_BACKLOG",
           "pending-connection queue of the listening socket (reconnect storms); capped by net.core.somaxconn",
           minimum=1),
        _f("workers", "int", 1, "AUTOGPT_WS_WORKERS",
           "server processes sharing the port (SO_REUSEPORT); 1 runs in-process", minimum=1),
        _f("app_env", "str", "local", "APP_ENV", "deployment name; prod refuses localhost CORS origins"),
        _f("log_level", "str", "info", "LOG_LEVEL", "lowest level logged", choices=LOG_LEVELS),
        _f("log_format", "str", "text", "LOG_FORMAT", "text, or json (one object per line)",
           choices=("text", "json")),
        _f("shutdown_timeout", "float", 10.0, "AUTOGPT_WS_SHUTDOWN_TIMEOUT",
           "seconds to wait for sockets to close (1001) on shutdown before aborting them", minimum=0),
    )),
    ("Authentication", (
        _f("enable_auth", "bool", True, "ENABLE_AUTH", "verify a JWT at the handshake; false: every socket is the default user"),
        _f("jwt_verify_key", "str", "", ("JWT_VERIFY_KEY", "SUPABASE_JWT_SECRET"),
           "shared secret (HS*) or PEM public key; JWT_VERIFY_KEY, falling back to SUPABASE_JWT_SECRET"),
        _f("jwt_verify_key_file", "str", "", "JWT_VERIFY_KEY_FILE", "read jwt_verify_key from this file instead"),
        _f("jwt_sign_algorithm", "str", "HS256", "JWT_SIGN_ALGORITHM", "algorithm of jwt_verify_key",
           choices=JWT_ALGORITHMS),
        _f("jwt_jwks_url", "str", "", "JWT_JWKS_URL", "key-set mode: http(s):// or file:// URL of a JWKS; wins over jwt_verify_key"),
        _f("jwt_jwks_algorithms", "list", ("ES256", "RS256", "EdDSA"), "JWT_JWKS_ALGORITHMS",
           "algorithms accepted in key-set mode (HS* and none refused)"),
        _f("jwt_jwks_timeout", "float", 5.0, "JWT_JWKS_TIMEOUT", "seconds allowed for one key-set fetch", minimum=0.1),
        _f("jwt_jwks_refetch_interval", "float", 60.0, "JWT_JWKS_REFETCH_INTERVAL",
           "an unknown kid refetches the key set at most this often (seconds)", minimum=0),
        _f("jwt_audience", "str", "authenticated", "JWT_AUDIENCE", "required audience"),
        _f("jwt_leeway", "float", 0.0, "JWT_LEEWAY", "clock skew allowed on exp/nbf/iat (seconds)", minimum=0),
        _f("jwks_allow_insecure_transport", "bool", False, "JWKS_ALLOW_INSECURE_TRANSPORT",
           "key-set mode: no warning for a plain http:// JWKS URL on a host that is not local"),
        _f("auth_failure", "str", "http", "AUTH_FAILURE",
           "http: refuse the upgrade with 403, as the AutoGPT server does; close: complete the handshake then close 4001/4002/4003",
           choices=("http", "close")),
        _f("token_expiry_close", "bool", False, "TOKEN_EXPIRY_CLOSE",
           "close a socket with 4003 Token expired when its token's exp passes (the AutoGPT server never does)"),
        _f("token_expiry_grace", "float", 0.0, "TOKEN_EXPIRY_GRACE", "seconds after exp before that close", minimum=0),
    )),
    ("HTTP", (
        _f("cors_allow_origins", "list", ("http://localhost:3000",), "BACKEND_CORS_ALLOW_ORIGINS",
           "CORS origins for HTTP routes (JSON list; entries may be regex:<pattern>)"),
        _f("enable_metrics", "bool", False, "ENABLE_METRICS", "serve Prometheus metrics on /metrics"),
    )),
    ("HTTP limits", (
        _f("max_request_line", "size", 8 * KiB, "WS_MAX_REQUEST_LINE",
           "longest request line (with its CRLF), /ws upgrade included; over it: HTTP 414 and close", minimum=64),
        _f("max_request_head", "size", 16 * KiB, "WS_MAX_REQUEST_HEAD",
           "largest request head (request line, headers, blank line); over it, or over 100 headers: HTTP 431 and close",
           minimum=256),
        _f("max_http_connections", "int", 4096, "WS_MAX_HTTP_CONNECTIONS",
           "connections not (yet) WebSockets: HTTP requests and heads in progress; beyond it: HTTP 503 and close (0: no limit)",
           minimum=0),
    )),
    ("Event bus", (
        _f("event_bus", "str", "auto", "EVENT_BUS",
           "auto: memory when no Redis is configured, else ask that Redis (INFO cluster) and use redis-cluster or redis; "
           "or name one: memory (embedded), redis (classic PSUBSCRIBE), redis-cluster (sharded SSUBSCRIBE)",
           choices=("auto", "memory", "redis", "redis-cluster")),
        _f("execution_event_bus_name", "str", "execution_event", "EXECUTION_EVENT_BUS_NAME", "execution events channel prefix"),
        _f("notification_event_bus_name", "str", "notification_event", "NOTIFICATION_EVENT_BUS_NAME", "notifications channel prefix"),
        _f("redis_url", "str", "", "REDIS_URL", "redis:// or rediss:// URL (reserved characters in the password percent-encoded: # as %23); wins over the redis_* settings below"),
        _f("redis_host", "str", "localhost", "REDIS_HOST", "Redis host"),
        _f("redis_port", "int", 6379, "REDIS_PORT", "Redis port", minimum=1, maximum=65535),
        _f("redis_username", "str", "", "REDIS_USERNAME", "Redis ACL user (empty: default user)"),
        _f("redis_password", "str", "", "REDIS_PASSWORD", "Redis password"),
        _f("redis_db", "int", 0, "REDIS_DB", "Redis database number", minimum=0),
        _f("redis_tls", "bool", False, "REDIS_TLS", "connect to Redis over TLS, verifying its name"),
        _f("redis_tls_ca_file", "str", "", "REDIS_TLS_CA_FILE", "CA bundle for Redis TLS (empty: system trust)"),
        _f("redis_connect_timeout", "float", 5.0, "REDIS_CONNECT_TIMEOUT", "seconds allowed to connect to Redis", minimum=0.1),
        _f("redis_cluster_host", "str", "", "REDIS_CLUSTER_HOST", "redis-cluster: the seed node's host (empty: redis_host)"),
        _f("redis_cluster_port", "int", 0, "REDIS_CLUSTER_PORT", "redis-cluster: the seed node's port (0: redis_port)",
           minimum=0, maximum=65535),
        _f("redis_cluster_nodes", "list", (), "REDIS_CLUSTER_NODES", "redis-cluster: more seed nodes, host:port"),
        _f("redis_use_announced_address", "bool", False, "REDIS_USE_ANNOUNCED_ADDRESS",
           "redis-cluster: reach shards at the addresses or host names they announce (false: the seed host with the announced port)"),
        _f("database_url", "str", "", "DATABASE_URL",
           "redis-cluster: AutoGPT's PostgreSQL, a postgresql:// URL (Prisma's; ?schema= honoured; reserved characters in the password percent-encoded), to look an execution up"),
        _f("database_timeout", "float", 5.0, "AUTOGPT_WS_DATABASE_TIMEOUT",
           "redis-cluster: seconds an execution lookup may take before the subscribe gets an error reply", minimum=0.1),
        _f("execution_not_found_reply", "bool", True, "EXECUTION_NOT_FOUND_REPLY",
           "redis-cluster: answer a subscribe to an unknown, deleted or other user's execution with the AutoGPT "
           "server's error (false: no reply)"),
        _f("max_message_size_limit", "size", 16 * MiB, "MAX_MESSAGE_SIZE_LIMIT",
           "largest event envelope published, or read from the bus (larger: dropped, counted oversized)", minimum=1),
    )),
    ("WebSocket limits", (
        _f("max_inbound_frame", "size", 64 * KiB, "WS_MAX_MESSAGE_SIZE", "largest client message (after inflating, when compressed); over it: close 1009", minimum=16),
        _f("max_message_frames", "int", 32, "WS_MAX_MESSAGE_FRAMES", "frames one client message may span; beyond it: close 1009", minimum=1),
        _f("max_send_buffer", "size", 1 * MiB, "WS_MAX_SEND_BUFFER", "unsent bytes a socket may hold, every frame counted (pongs too): a frame due while more is unsent closes it 1013 slow consumer (keep it above your largest event)", minimum=1024),
        _f("max_connections", "int", 20000, "WS_MAX_CONNECTIONS", "open sockets per worker process; beyond it the upgrade gets HTTP 503 (0: no limit)", minimum=0),
        _f("max_connections_per_user", "int", 64, "WS_MAX_CONNECTIONS_PER_USER", "sockets per user in one worker process; beyond it: close 1008 (0: no limit)", minimum=0),
        _f("max_subscriptions_per_socket", "int", 1000, "WS_MAX_SUBSCRIPTIONS", "subscriptions per socket; beyond it: error Subscription limit reached (0: no limit)", minimum=0),
        _f("rate_limit", "float", 20.0, "WS_RATE_LIMIT", "client frames per second per socket, sustained; every frame counts, pings and continuations too (0: no limit)", minimum=0),
        _f("rate_burst", "int", 60, "WS_RATE_BURST", "client frames allowed at once above the rate", minimum=1),
        _f("rate_abuse_close", "int", 100, "WS_RATE_ABUSE_CLOSE", "frames refused in a row before closing 1008", minimum=1),
        _f("open_handshake_timeout", "float", 10.0, "WS_OPEN_HANDSHAKE_TIMEOUT", "seconds for a client to send each request head, and to complete the upgrade", minimum=0),
        _f("ping_interval", "float", 20.0, "WS_PING_INTERVAL", "protocol ping every N seconds (0: off)", minimum=0),
        _f("ping_timeout", "float", 20.0, "WS_PING_TIMEOUT", "close a socket whose pong is this late", minimum=0),
        _f("permessage_deflate", "bool", True, "WS_PERMESSAGE_DEFLATE",
           "accept permessage-deflate when a client offers it (the client's messages each compressed on its own)"),
        _f("deflate_threshold", "size", 512, "WS_DEFLATE_THRESHOLD",
           "pushed frames under this many bytes go uncompressed to compressing sockets", minimum=0),
        _f("deflate_level", "int", 1, "WS_DEFLATE_LEVEL",
           "compression level of pushed frames (ISA-L's), 0 (fastest) to 3 (smallest); each frame is compressed once per window size and form",
           minimum=0, maximum=3),
        _f("deflate_history", "size", 8 * KiB, "WS_DEFLATE_HISTORY",
           "keyed history: a pushed frame may be compressed with up to this many bytes of the end of the previous "
           "frame of its key, kept per active key (0: off, each frame compressed on its own)",
           minimum=0, maximum=32 * KiB),
        _f("ws_allowed_origins", "list", (), "WS_ALLOWED_ORIGINS", "upgrade Origin allow-list, exact or regex:<pattern> (empty: any); null is an origin: list it to allow it"),
        _f("ws_allow_missing_origin", "bool", True, "WS_ALLOW_MISSING_ORIGIN", "with an allow-list, accept upgrades that carry no Origin"),
    )),
    ("Catch-up on subscribe", (
        _f("catchup_enabled", "bool", True, "CATCHUP_ENABLED", "replay the latest graph event of an execution on subscribe"),
        _f("catchup_max_bytes", "size", 64 * MiB, "CATCHUP_MAX_BYTES", "bytes of events kept for catch-up", minimum=0),
        _f("catchup_max_age", "float", 3600.0, "CATCHUP_MAX_AGE", "seconds an execution's latest event is kept", minimum=0),
        _f("catchup_recent_final", "float", 300.0, "CATCHUP_RECENT_FINAL", "graph-wide catch-up includes runs that ended this recently (s)", minimum=0),
        _f("catchup_graph_limit", "int", 50, "CATCHUP_GRAPH_LIMIT", "most events replayed on a graph-wide subscribe", minimum=0),
        _f("catchup_linger", "float", 30.0, "CATCHUP_LINGER",
           "redis-cluster: keep an execution's channels subscribed this long after their last socket left, "
           "recording what a reconnecting browser missed (s; 0: off)", minimum=0),
        _f("catchup_store", "bool", True, "CATCHUP_STORE",
           "redis-cluster: keep the latest graph event of each execution subscribed here in the cluster itself "
           "(a key in its channels' slot, TTL catchup_max_age), for other servers and restarts"),
        _f("catchup_store_max_event", "size", 1 * MiB, "CATCHUP_STORE_MAX_EVENT",
           "redis-cluster: largest graph event written to the store (larger: kept here only, counted)", minimum=0),
        _f("catchup_handover", "float", 3.0, "CATCHUP_HANDOVER",
           "redis-cluster: on a graceful stop, keep recording up to this long until another server holds each "
           "channel (a rolling restart loses nothing; s, within shutdown_timeout; 0: off)", minimum=0),
    )),
)

FIELDS: tuple[Field, ...] = tuple(
    dataclasses.replace(f, section=name) for name, fields in SECTIONS for f in fields
)
BY_KEY: dict[str, Field] = {f.key: f for f in FIELDS}


def _defaults_from_fields(cls: type) -> type:
    """Give each annotated attribute its default from FIELDS, and refuse a
    class whose attributes differ from FIELDS: a new setting is one entry in
    SECTIONS plus one typed line in Settings, and this says which is missing."""
    names = list(cls.__annotations__)
    missing = [f.key for f in FIELDS if f.key not in names]
    extra = [name for name in names if name not in BY_KEY]
    if missing or extra:
        raise TypeError(f"Settings and FIELDS disagree: declare {missing} in Settings, "
                        f"or add {extra} to SECTIONS")
    for field in FIELDS:
        setattr(cls, field.key, field.default)
    return cls


@dataclass(frozen=True)
@_defaults_from_fields
class Settings:
    """Every setting, typed and validated. Built by :func:`load`; the
    defaults, environment names and docs live in FIELDS only."""

    host: str
    port: int
    listen: str
    listen_backlog: int
    workers: int
    app_env: str
    log_level: str
    log_format: str
    shutdown_timeout: float
    enable_auth: bool
    jwt_verify_key: str
    jwt_verify_key_file: str
    jwt_sign_algorithm: str
    jwt_jwks_url: str
    jwt_jwks_algorithms: tuple[str, ...]
    jwt_jwks_timeout: float
    jwt_jwks_refetch_interval: float
    jwt_audience: str
    jwt_leeway: float
    jwks_allow_insecure_transport: bool
    auth_failure: str
    token_expiry_close: bool
    token_expiry_grace: float
    cors_allow_origins: tuple[str, ...]
    enable_metrics: bool
    max_request_line: int
    max_request_head: int
    max_http_connections: int
    event_bus: str
    execution_event_bus_name: str
    notification_event_bus_name: str
    redis_url: str
    redis_host: str
    redis_port: int
    redis_username: str
    redis_password: str
    redis_db: int
    redis_tls: bool
    redis_tls_ca_file: str
    redis_connect_timeout: float
    redis_cluster_host: str
    redis_cluster_port: int
    redis_cluster_nodes: tuple[str, ...]
    redis_use_announced_address: bool
    database_url: str
    database_timeout: float
    execution_not_found_reply: bool
    max_message_size_limit: int
    max_inbound_frame: int
    max_message_frames: int
    max_send_buffer: int
    max_connections: int
    max_connections_per_user: int
    max_subscriptions_per_socket: int
    rate_limit: float
    rate_burst: int
    rate_abuse_close: int
    open_handshake_timeout: float
    ping_interval: float
    ping_timeout: float
    permessage_deflate: bool
    deflate_threshold: int
    deflate_level: int
    deflate_history: int
    ws_allowed_origins: tuple[str, ...]
    ws_allow_missing_origin: bool
    catchup_enabled: bool
    catchup_max_bytes: int
    catchup_max_age: float
    catchup_recent_final: float
    catchup_graph_limit: int
    catchup_linger: float
    catchup_store: bool
    catchup_store_max_event: int
    catchup_handover: float

    @property
    def endpoint(self) -> str:
        """The Twisted server endpoint string this server listens on."""
        if self.listen:
            return self.listen
        host = self.host.replace(":", "\\:")
        return f"tcp:{self.port}:interface={host}:backlog={self.listen_backlog}"

    @property
    def auth_mode(self) -> str:
        if not self.enable_auth:
            return "disabled"
        return "jwks" if self.jwt_jwks_url else "secret"

    def replace(self, **changes: Any) -> "Settings":
        return dataclasses.replace(self, **changes)
