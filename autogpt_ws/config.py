"""Settings: one loader for every runner.

Precedence, lowest first: built-in defaults < ``config.yaml`` < environment
variables < command-line overrides.  Every setting is declared once in
``FIELDS`` (key, kind, default, environment names, one line of doc); the
loader, the validation, ``config.yaml`` and the settings table of docs/operations.md all follow it.
A bad value raises :class:`ConfigError` naming the setting and where it came
from; the runners turn that into one line on stderr and exit status 2.
"""

from __future__ import annotations

import difflib
import json
import os
import re
from typing import Any, Iterable, Mapping

import yaml

from .settings import (_CONVERT, BY_KEY,  # noqa: F401 (the declarations, for whoever reads them from here)
                       DEFAULT_USER_ID, FIELDS, JWT_ALGORITHMS, LOG_LEVELS, SECTIONS, Field, KiB, MiB, Settings)


class ConfigError(Exception):
    """A setting has a bad value. ``str()`` is the one line shown to the user."""

    def __init__(self, key: str, problem: str, source: str = "") -> None:
        self.key = key
        self.problem = problem
        self.source = source
        where = f" (from {source})" if source else ""
        super().__init__(f"configuration error: {key}{where}: {problem}")


# ---------------------------------------------------------------------------
# loading


def read_file(path: str) -> dict[str, Any]:
    """Read a config.yaml; unknown keys and bad YAML are ConfigErrors."""
    try:
        with open(path, encoding="utf-8") as handle:
            data = yaml.safe_load(handle)
    except FileNotFoundError:
        raise ConfigError("config", f"file {path!r} does not exist") from None
    except OSError as exc:
        raise ConfigError("config", f"cannot read {path!r}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConfigError("config", f"{path!r} is not valid YAML{where}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError("config", f"{path!r} must hold a mapping of settings")
    for key in data:
        if key not in BY_KEY:
            raise ConfigError(str(key), f"unknown setting in {path}{_did_you_mean(str(key))}")
    return dict(data)


def _did_you_mean(key: str) -> str:
    close = difflib.get_close_matches(key, BY_KEY, n=1)
    return f" (did you mean {close[0]}?)" if close else ""


def _convert(field: Field, raw: Any, source: str) -> Any:
    try:
        value = _CONVERT[field.kind](raw)
    except ValueError as exc:
        raise ConfigError(field.key, str(exc), source) from None
    if field.choices and value not in field.choices:
        # log levels and bus names are case-insensitive for convenience
        lowered = {c.lower(): c for c in field.choices}
        if field.key == "log_level" and isinstance(value, str) and value.lower() == "warning":
            value = "warn"
        if isinstance(value, str) and value.lower() in lowered:
            value = lowered[value.lower()]
        else:
            raise ConfigError(field.key, f"{value!r} is not one of {', '.join(field.choices)}", source)
    if field.minimum is not None and value < field.minimum:
        raise ConfigError(field.key, f"{value!r} is below the minimum {field.minimum:g}", source)
    if field.maximum is not None and value > field.maximum:
        raise ConfigError(field.key, f"{value!r} is above the maximum {field.maximum:g}", source)
    return value


def load(
    file: str | None = None,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Settings:
    """Build validated Settings: defaults < file < env < overrides.

    ``file`` None means no file; ``env`` None means ``os.environ``.
    ``overrides`` maps setting keys to raw values (strings from the command
    line, or typed values); None values are skipped.
    """
    env = os.environ if env is None else env
    values: dict[str, Any] = {}
    given: set[str] = set()  # keys the environment or command line set, or the file changed
    if file:
        for key, raw in read_file(file).items():
            values[key] = _convert(BY_KEY[key], raw, file)
            if values[key] != BY_KEY[key].default:
                given.add(key)
    for field in FIELDS:
        for name in field.env:
            raw = env.get(name)
            # an empty variable counts only where it is the sole name
            if raw is not None and (raw.strip() or (field.kind == "str" and len(field.env) == 1)):
                values[field.key] = _convert(field, raw, f"${name}")
                given.add(field.key)
                break
    for key, raw in (overrides or {}).items():
        if raw is None:
            continue
        if key not in BY_KEY:
            raise ConfigError(key, f"unknown setting{_did_you_mean(key)}", "command line")
        values[key] = _convert(BY_KEY[key], raw, "command line")
        given.add(key)
    if values.get("event_bus", "auto") == "auto" and not any(values.get(key) for key in given & REDIS_LOCATION):
        values["event_bus"] = "memory"  # nothing names a Redis: the embedded bus
    settings = Settings(**values)
    return validate(settings)


# Settings that say where a Redis is.  With event_bus auto, the server asks
# that Redis what it is when any of them is set (not empty) by the
# environment or the command line, or changed from its default by the file
# (the generated config.yaml lists every default, and names no Redis);
# otherwise it runs the embedded bus.
REDIS_LOCATION = frozenset(("redis_url", "redis_host", "redis_port", "redis_cluster_host", "redis_cluster_port",
                            "redis_cluster_nodes"))


def validate(settings: Settings) -> Settings:
    """Checks that span settings or touch the filesystem. Returns the
    settings, with jwt_verify_key read from its file when one is named."""
    if settings.listen:
        _check_endpoint(settings.listen)
    if settings.max_request_line > settings.max_request_head:
        raise ConfigError("max_request_line", f"{settings.max_request_line} is above max_request_head "
                          f"({settings.max_request_head}): the request line is part of the head")
    if settings.jwt_verify_key_file:
        try:
            with open(settings.jwt_verify_key_file, encoding="utf-8") as handle:
                settings = settings.replace(jwt_verify_key=handle.read().strip())
        except OSError as exc:
            raise ConfigError("jwt_verify_key_file", f"cannot read {settings.jwt_verify_key_file!r}: {exc.strerror}") from None
    if settings.enable_auth:
        if settings.jwt_jwks_url:
            _check_jwks(settings)
        elif not settings.jwt_verify_key.strip():
            raise ConfigError("jwt_verify_key", "required when enable_auth is true (set JWT_VERIFY_KEY, or JWT_JWKS_URL, or ENABLE_AUTH=false)")
    for origin in settings.cors_allow_origins + settings.ws_allowed_origins:
        if origin.startswith("regex:"):
            try:
                re.compile(origin[6:])
            except re.error as exc:
                raise ConfigError("cors_allow_origins" if origin in settings.cors_allow_origins else "ws_allowed_origins",
                                  f"bad regex {origin!r}: {exc}") from None
    if settings.app_env.lower() in ("prod", "production"):
        for origin in settings.cors_allow_origins:
            if _is_local_origin(origin):
                raise ConfigError("cors_allow_origins", f"{origin!r} is a localhost origin, refused when APP_ENV=prod")
    if settings.redis_url:
        _check_url("redis_url", settings.redis_url, redis=True)
    if settings.redis_tls_ca_file and not os.path.isfile(settings.redis_tls_ca_file):
        raise ConfigError("redis_tls_ca_file", f"file {settings.redis_tls_ca_file!r} does not exist")
    for node in settings.redis_cluster_nodes:
        host, _, port = node.rpartition(":")
        if not host or not port.isdigit():
            raise ConfigError("redis_cluster_nodes", f"{node!r} is not host:port")
    if settings.database_url:
        _check_url("database_url", settings.database_url, redis=False)
    if settings.event_bus == "redis-cluster" and not settings.database_url:
        raise ConfigError("database_url", "required when event_bus is redis-cluster (an execution's graph id comes from the AutoGPT database)")
    return settings


_LOCAL_HOSTS = ("localhost", "127.0.0.1", "::1", "0.0.0.0")
_LOCAL_PROBES = tuple(f"{scheme}://{host}{port}" for scheme in ("http", "https")
                      for host in ("localhost", "127.0.0.1", "[::1]") for port in ("", ":3000", ":8000", ":8080"))


def _is_local_origin(origin: str) -> bool:
    """An exact origin naming a loopback host, or a regex that matches one."""
    if origin.startswith("regex:"):
        pattern = re.compile(origin[6:])
        return any(pattern.fullmatch(probe) for probe in _LOCAL_PROBES)
    from urllib.parse import urlsplit

    try:
        host = urlsplit(origin).hostname or ""
    except ValueError:
        return False
    return host in _LOCAL_HOSTS or host.endswith(".localhost")


def _check_jwks(settings: Settings) -> None:
    url = settings.jwt_jwks_url
    if not re.match(r"^(https?|file)://", url):
        raise ConfigError("jwt_jwks_url", f"{url!r} must be an http://, https:// or file:// URL")
    if url.startswith("file://") and not os.path.isfile(url[7:]):
        raise ConfigError("jwt_jwks_url", f"file {url[7:]!r} does not exist")
    if not settings.jwt_jwks_algorithms:
        raise ConfigError("jwt_jwks_algorithms", "must name at least one algorithm")
    for alg in settings.jwt_jwks_algorithms:
        if alg.upper().startswith("HS") or alg.lower() == "none":
            raise ConfigError("jwt_jwks_algorithms", f"{alg!r} is refused in key-set mode (asymmetric algorithms only)")
        if alg not in JWT_ALGORITHMS:
            raise ConfigError("jwt_jwks_algorithms", f"{alg!r} is not a known algorithm")


_KEY_OPTIONS = ("privateKey", "certKey", "extraCertChain", "caCertsDir", "dhParameters")


def _check_endpoint(description: str) -> None:
    """Reject what would fail at listen time: unknown types, bad ports,
    missing key files."""
    kind, _, rest = description.partition(":")
    if kind not in ("tcp", "tcp6", "ssl", "unix", "systemd"):
        raise ConfigError("listen", f"{description!r}: unsupported endpoint type {kind!r} (tcp, tcp6, ssl, unix, systemd)")
    args = re.split(r"(?<!\\):", rest) if rest else []
    if kind in ("tcp", "tcp6", "ssl"):
        port = next((a for a in args if "=" not in a), None)
        port = port if port is not None else next((a[5:] for a in args if a.startswith("port=")), "")
        if not port.isdigit() or int(port) > 65535:
            raise ConfigError("listen", f"{description!r}: port {port!r} is not a valid port")
    for arg in args:
        name, sep, value = arg.partition("=")
        if sep and name in _KEY_OPTIONS and value and not os.path.exists(value.replace("\\:", ":")):
            raise ConfigError("listen", f"{name} file {value!r} does not exist")
    if kind == "ssl" and not any(a.startswith("privateKey=") for a in args):
        raise ConfigError("listen", f"{description!r}: ssl endpoints need privateKey=<file>")


_URL_HINT = ("percent-encode reserved characters in the user name and password "
             "(# as %23, ? as %3F, / as %2F, @ as %40, : as %3A, % as %25)")


def _check_url(key: str, url: str, *, redis: bool) -> None:
    """Refuse a Redis URL (``redis``) or a PostgreSQL one that would fail
    later, at connect time, with a traceback: another scheme, a port part
    that is not a number, text after the host that is really the rest of
    a password (a ``#``, ``?`` or ``/`` in it ends the authority early),
    and for Redis a database that is not a number.  Past the scheme the
    URL is never shown: what is cut off may be a password."""
    from urllib.parse import urlsplit

    if redis and not re.match(r"^rediss?://", url):
        raise ConfigError(key, f"{_redact_url(url)!r} must start with redis:// or rediss://")
    if not redis and not re.match(r"^postgres(ql)?://", url):
        raise ConfigError(key, "must start with postgresql:// (or postgres://)")
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 (raises ValueError when the port part is not a number or out of range)
    except ValueError:
        raise ConfigError(key, f"its host and port cannot be read (the port must be a number, 0 to 65535); "
                          f"{_URL_HINT}") from None
    if parts.fragment or "@" in parts.path or "@" in parts.query:
        raise ConfigError(key, f"text after its host looks like the rest of a password; {_URL_HINT}")
    if not redis:
        return
    db = parts.path.lstrip("/")  # no host is localhost, as redis_address() and redis-py take it
    if db and not db.isdigit():
        raise ConfigError(key, "the path must be a database number (redis://host:6379/0)")


def _redact_url(url: str) -> str:
    return re.sub(r"//[^@/]*@", "//***@", url)


def redis_address(settings: Settings) -> dict[str, Any]:
    """host, port, username, password, db, tls for the classic bus."""
    if settings.redis_url:
        from urllib.parse import unquote, urlsplit

        parts = urlsplit(settings.redis_url)
        db = parts.path.lstrip("/")
        return {
            "host": parts.hostname or "localhost",
            "port": parts.port or 6379,
            "username": unquote(parts.username or ""),
            "password": unquote(parts.password or "") or settings.redis_password,
            "db": int(db) if db.isdigit() else settings.redis_db,
            "tls": parts.scheme == "rediss",
        }
    return {
        "host": settings.redis_host or "localhost",
        "port": settings.redis_port,
        "username": settings.redis_username,
        "password": settings.redis_password,
        "db": settings.redis_db,
        "tls": settings.redis_tls,
    }


def redis_seed(settings: Settings) -> tuple[str, int]:
    """The cluster node the cluster bus (and the bus detection) asks first:
    REDIS_CLUSTER_HOST/PORT where set, else the classic address
    (REDIS_URL, or REDIS_HOST/REDIS_PORT), as the AutoGPT server does."""
    address = redis_address(settings)
    return settings.redis_cluster_host or address["host"], settings.redis_cluster_port or address["port"]


def config_file_from(argument: str | None, env: Mapping[str, str] | None = None) -> str | None:
    """The config file to read: --config, else $AUTOGPT_WS_CONFIG, else
    ./config.yaml when present, else none."""
    env = os.environ if env is None else env
    if argument:
        return argument
    if env.get("AUTOGPT_WS_CONFIG"):
        return env["AUTOGPT_WS_CONFIG"]
    return "config.yaml" if os.path.isfile("config.yaml") else None


def format_default(field: Field) -> str:
    """A field's default written as a YAML value that loads back to it."""
    value = field.default
    if field.kind == "bool":
        return "true" if value else "false"
    if field.kind == "size":
        for unit, size in (("GiB", 1024 * MiB), ("MiB", MiB), ("KiB", KiB)):
            if value and value % size == 0:
                return f"{value // size}{unit}"
        return str(value)
    if field.kind == "list":
        return json.dumps(list(value), ensure_ascii=False)
    if field.kind == "str":
        return json.dumps(value, ensure_ascii=False)
    return repr(value)


def _comment(field: Field) -> str:
    doc = field.doc
    if field.choices and not all(choice in doc for choice in field.choices):
        doc += f"; one of {', '.join(field.choices)}"
    return f"# {doc}  [env: {', '.join(field.env)}]"


YAML_HEADER = """\
# autogpt-ws configuration: every setting, with its default.
#
# Read from --config PATH, else $AUTOGPT_WS_CONFIG, else ./config.yaml.
# Precedence, lowest first: built-in defaults < this file < environment
# variables < command-line options (--port, --host, --listen, --log-level,
# --log-format, --set key=value). Unknown keys are refused.
# Sizes take K/KiB, M/MiB or G/GiB; lists are YAML or JSON lists.
#
# Generated from autogpt_ws/config.py (python -m autogpt_ws.config --yaml);
# tests/test_config.py checks that this file and the code agree.
"""


def render_yaml(sections: Iterable[tuple[str, Iterable[Field]]] | None = None) -> str:
    """The text of config.yaml: every field, grouped by section, with its
    default and one comment."""
    groups = SECTIONS if sections is None else sections
    parts = [YAML_HEADER]
    for name, fields in groups:
        parts.append(f"\n# == {name} " + "=" * max(0, 72 - len(name)) + "\n")
        for field in fields:
            parts.append(f"\n{_comment(field)}\n{field.key}: {format_default(field)}\n")
    return "".join(parts)


def render_markdown(fields: Iterable[Field] = FIELDS) -> str:
    """The settings table of docs/operations.md: setting, environment, default, meaning."""
    def cell(text: str) -> str:
        return text.replace("|", "\\|")

    rows = ["| setting | environment | default | meaning |", "|---|---|---|---|"]
    for field in fields:
        env = ", ".join(f"`{name}`" for name in field.env)
        doc = field.doc
        if field.choices and not all(choice in doc for choice in field.choices):
            doc += f"; one of {', '.join(field.choices)}"
        rows.append(f"| `{field.key}` | {env} | `{cell(format_default(field))}` | {cell(doc)} |")
    return "\n".join(rows) + "\n"


def main(argv: list[str] | None = None) -> int:
    """``python -m autogpt_ws.config --yaml`` prints config.yaml;
    ``--markdown`` prints the settings table of docs/operations.md."""
    import sys

    args = sys.argv[1:] if argv is None else argv
    if args == ["--yaml"]:
        sys.stdout.write(render_yaml())
        return 0
    if args == ["--markdown"]:
        sys.stdout.write(render_markdown())
        return 0
    sys.stderr.write("usage: python -m autogpt_ws.config --yaml | --markdown\n")
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
