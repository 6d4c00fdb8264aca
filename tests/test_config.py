"""Settings: one loader for every runner; precedence defaults < file < env <
command line; every bad value refused with one line naming the setting; and
config.yaml kept equal to what the code says."""

from __future__ import annotations

import dataclasses
import os
import typing
from typing import Any

import yaml
from twisted.trial.unittest import TestCase

from autogpt_ws import config
from autogpt_ws.config import FIELDS, ConfigError, KiB, MiB, Settings, load

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NO_AUTH = {"ENABLE_AUTH": "false"}


class Base(TestCase):
    def write(self, text: str, name: str = "config.yaml") -> str:
        directory = self.mktemp()
        os.makedirs(directory)
        path = os.path.join(directory, name)
        with open(path, "w", encoding="utf-8") as handle:
            handle.write(text)
        return path

    def refused(self, key: str, file: str | None = None, env: dict[str, str] | None = None,
                overrides: dict[str, Any] | None = None, contains: str = "") -> ConfigError:
        """load() fails with a ConfigError about ``key``, shown as one line."""
        with self.assertRaises(ConfigError) as caught:
            load(file, env if env is not None else dict(NO_AUTH), overrides)
        error = caught.exception
        self.assertEqual(error.key, key, str(error))
        line = str(error)
        self.assertNotIn("\n", line)
        self.assertTrue(line.startswith(f"configuration error: {key}"), line)
        self.assertIn(contains, line)
        return error


class Precedence(Base):
    def test_defaults(self) -> None:
        settings = load(None, NO_AUTH)
        self.assertEqual(settings.port, 8001)
        self.assertEqual(settings.host, "0.0.0.0")
        self.assertEqual(settings.endpoint, "tcp:8001:interface=0.0.0.0:backlog=4096")
        self.assertEqual(settings.cors_allow_origins, ("http://localhost:3000",))
        self.assertEqual(settings.max_inbound_frame, 64 * KiB)
        self.assertEqual(settings.max_message_size_limit, 16 * MiB)
        self.assertEqual(settings.shutdown_timeout, 10.0)
        self.assertEqual(settings.jwt_jwks_algorithms, ("ES256", "RS256", "EdDSA"))
        self.assertEqual(settings.event_bus, "memory")

    def test_file_env_overrides(self) -> None:
        path = self.write("port: 9001\nhost: 10.0.0.1\nlog_level: debug\nrate_limit: 5\n")
        from_file = load(path, NO_AUTH)
        self.assertEqual((from_file.port, from_file.host, from_file.log_level, from_file.rate_limit),
                         (9001, "10.0.0.1", "debug", 5.0))
        env = {**NO_AUTH, "WEBSOCKET_SERVER_PORT": "9002", "LOG_LEVEL": "WARN"}
        from_env = load(path, env)
        self.assertEqual((from_env.port, from_env.host, from_env.log_level), (9002, "10.0.0.1", "warn"))
        from_cli = load(path, env, {"port": "9003", "log_level": None})
        self.assertEqual((from_cli.port, from_cli.host, from_cli.log_level), (9003, "10.0.0.1", "warn"))

    def test_empty_file_and_empty_env_values(self) -> None:
        path = self.write("# nothing but a comment\n")
        settings = load(path, {**NO_AUTH, "WEBSOCKET_SERVER_PORT": "", "WS_RATE_LIMIT": "  "})
        self.assertEqual((settings.port, settings.rate_limit), (8001, 20.0))

    def test_listen_wins_over_host_and_port(self) -> None:
        settings = load(None, NO_AUTH, {"listen": "tcp:9100:interface=127.0.0.1", "port": "9200"})
        self.assertEqual(settings.endpoint, "tcp:9100:interface=127.0.0.1")

    def test_supabase_secret_fallback(self) -> None:
        env = {"SUPABASE_JWT_SECRET": "from-supabase"}
        self.assertEqual(load(None, env).jwt_verify_key, "from-supabase")
        self.assertEqual(load(None, {**env, "JWT_VERIFY_KEY": "own"}).jwt_verify_key, "own")
        # an empty JWT_VERIFY_KEY is missing, so the fallback applies
        self.assertEqual(load(None, {**env, "JWT_VERIFY_KEY": ""}).jwt_verify_key, "from-supabase")

    def test_jwt_key_file(self) -> None:
        path = self.write("  secret-from-file\n", "key.txt")
        settings = load(None, {"JWT_VERIFY_KEY_FILE": path})
        self.assertEqual(settings.jwt_verify_key, "secret-from-file")

    def test_sizes(self) -> None:
        cases = {"65536": 65536, "64KiB": 64 * KiB, "64k": 64 * KiB, "64 KB": 64 * KiB,
                 "1MiB": MiB, "2m": 2 * MiB, "1GiB": 1024 * MiB, "100b": 100}
        for raw, expected in cases.items():
            self.assertEqual(load(None, {**NO_AUTH, "WS_MAX_MESSAGE_SIZE": raw}).max_inbound_frame, expected, raw)
        path = self.write("max_inbound_frame: 32KiB\nmax_send_buffer: 2097152\n")
        settings = load(path, NO_AUTH)
        self.assertEqual((settings.max_inbound_frame, settings.max_send_buffer), (32 * KiB, 2 * MiB))

    def test_lists(self) -> None:
        env = {**NO_AUTH, "BACKEND_CORS_ALLOW_ORIGINS": '["https://a.example", "regex:https://.*\\\\.b\\\\.example"]'}
        self.assertEqual(load(None, env).cors_allow_origins, ("https://a.example", r"regex:https://.*\.b\.example"))
        env = {**NO_AUTH, "BACKEND_CORS_ALLOW_ORIGINS": "https://a.example, https://c.example"}
        self.assertEqual(load(None, env).cors_allow_origins, ("https://a.example", "https://c.example"))
        path = self.write("cors_allow_origins:\n  - https://d.example\n")
        self.assertEqual(load(path, NO_AUTH).cors_allow_origins, ("https://d.example",))

    def test_bools(self) -> None:
        for raw, expected in (("true", True), ("False", False), ("1", True), ("0", False),
                              ("yes", True), ("off", False)):
            self.assertEqual(load(None, {**NO_AUTH, "ENABLE_METRICS": raw}).enable_metrics, expected, raw)

    def test_case_insensitive_choices(self) -> None:
        settings = load(None, {**NO_AUTH, "LOG_LEVEL": "WARNING", "EVENT_BUS": "Memory"})
        self.assertEqual((settings.log_level, settings.event_bus), ("warn", "memory"))
        self.assertEqual(load(None, {"JWT_VERIFY_KEY": "k", "JWT_SIGN_ALGORITHM": "hs512"}).jwt_sign_algorithm, "HS512")

    def test_config_file_choice(self) -> None:
        self.assertEqual(config.config_file_from("given.yaml", {"AUTOGPT_WS_CONFIG": "env.yaml"}), "given.yaml")
        self.assertEqual(config.config_file_from(None, {"AUTOGPT_WS_CONFIG": "env.yaml"}), "env.yaml")
        # trial runs in _trial_temp, which holds no config.yaml
        self.assertIsNone(config.config_file_from(None, {}))

    def test_settings_frozen(self) -> None:
        settings = load(None, NO_AUTH)
        with self.assertRaises(dataclasses.FrozenInstanceError):
            settings.port = 1  # type: ignore[misc]


class Rejections(Base):
    def test_unknown_key_in_file(self) -> None:
        path = self.write("port: 9000\nprot: 9001\n")
        self.refused("prot", path, contains="unknown setting")
        error = self.refused("prot", path)
        self.assertIn("did you mean port?", str(error))

    def test_unknown_override(self) -> None:
        self.refused("bogus", overrides={"bogus": "1"}, contains="unknown setting")

    def test_port_not_a_number(self) -> None:
        self.refused("port", env={**NO_AUTH, "WEBSOCKET_SERVER_PORT": "abc"}, contains="'abc' is not an integer")
        error = self.refused("port", overrides={"port": "abc"})
        self.assertEqual(error.source, "command line")

    def test_port_out_of_range(self) -> None:
        self.refused("port", overrides={"port": "70000"}, contains="70000")
        self.refused("port", overrides={"port": "-1"}, contains="-1")
        self.refused("port", file=self.write("port: 65536\n"), contains="65536")

    def test_env_source_named(self) -> None:
        error = self.refused("port", env={**NO_AUTH, "WEBSOCKET_SERVER_PORT": "x"})
        self.assertIn("$WEBSOCKET_SERVER_PORT", str(error))

    def test_unknown_algorithm(self) -> None:
        self.refused("jwt_sign_algorithm", env={"JWT_VERIFY_KEY": "k", "JWT_SIGN_ALGORITHM": "HS999"},
                     contains="HS999")

    def test_jwks_refuses_symmetric_and_none(self) -> None:
        for algorithms in ("HS256", "ES256,none", '["RS256", "HS512"]'):
            self.refused("jwt_jwks_algorithms", env={"JWT_JWKS_URL": "https://auth.example/jwks.json",
                                                     "JWT_JWKS_ALGORITHMS": algorithms}, contains="refused")
        self.refused("jwt_jwks_algorithms", env={"JWT_JWKS_URL": "https://auth.example/jwks.json",
                                                 "JWT_JWKS_ALGORITHMS": "XS256"}, contains="not a known")
        settings = load(None, {"JWT_JWKS_URL": "https://auth.example/jwks.json", "JWT_JWKS_ALGORITHMS": "RS256"})
        self.assertEqual((settings.auth_mode, settings.jwt_jwks_algorithms), ("jwks", ("RS256",)))

    def test_jwks_url_scheme(self) -> None:
        self.refused("jwt_jwks_url", env={"JWT_JWKS_URL": "ftp://auth.example/jwks.json"})

    def test_auth_needs_a_key(self) -> None:
        self.refused("jwt_verify_key", env={}, contains="ENABLE_AUTH=false")

    def test_missing_jwt_key_file(self) -> None:
        self.refused("jwt_verify_key_file", env={"JWT_VERIFY_KEY_FILE": "/nonexistent/key.pem"},
                     contains="/nonexistent/key.pem")

    def test_listen_tls_key_missing(self) -> None:
        self.refused("listen", overrides={"listen": "ssl:8443:privateKey=/nonexistent/key.pem"},
                     contains="privateKey file '/nonexistent/key.pem' does not exist")
        self.refused("listen", overrides={"listen": "ssl:8443"}, contains="privateKey")
        self.refused("listen", overrides={"listen": "tcp:notaport"}, contains="not a valid port")
        self.refused("listen", overrides={"listen": "carrier-pigeon:1"}, contains="unsupported endpoint")
        key = self.write("not really a key", "key.pem")
        settings = load(None, NO_AUTH, {"listen": f"ssl:8443:privateKey={key}"})
        self.assertEqual(settings.endpoint, f"ssl:8443:privateKey={key}")

    def test_bad_yaml(self) -> None:
        path = self.write("port: 9000\n  host: [unclosed\n")
        self.refused("config", path, contains="not valid YAML at line")
        self.refused("config", self.write("- a list\n- not a mapping\n"), contains="mapping")
        self.refused("config", "/nonexistent/config.yaml", contains="does not exist")

    def test_bad_bool(self) -> None:
        self.refused("enable_metrics", env={**NO_AUTH, "ENABLE_METRICS": "maybe"}, contains="not a boolean")
        self.refused("enable_auth", env={"ENABLE_AUTH": "nope"}, contains="not a boolean")

    def test_bad_json_list(self) -> None:
        self.refused("cors_allow_origins", env={**NO_AUTH, "BACKEND_CORS_ALLOW_ORIGINS": '["http://a.example"'},
                     contains="not a JSON list")
        self.refused("cors_allow_origins", env={**NO_AUTH, "BACKEND_CORS_ALLOW_ORIGINS": '[1, {"a": 2}]'},
                     contains="not a string")

    def test_bad_regex_origin(self) -> None:
        self.refused("cors_allow_origins", env={**NO_AUTH, "BACKEND_CORS_ALLOW_ORIGINS": '["regex:("]'},
                     contains="bad regex")

    def test_prod_refuses_localhost_origins(self) -> None:
        for origins in ('["http://localhost:3000"]', '["https://app.example", "http://127.0.0.1:8080"]',
                        '["regex:http://(localhost|app)(:\\\\d+)?"]'):
            self.refused("cors_allow_origins", env={**NO_AUTH, "APP_ENV": "prod",
                                                    "BACKEND_CORS_ALLOW_ORIGINS": origins}, contains="APP_ENV=prod")
        # the default list is refused too: prod must name its origins
        self.refused("cors_allow_origins", env={**NO_AUTH, "APP_ENV": "prod"})
        settings = load(None, {**NO_AUTH, "APP_ENV": "prod",
                               "BACKEND_CORS_ALLOW_ORIGINS": '["https://platform.agpt.co", "https://notlocalhost.example"]'})
        self.assertEqual(settings.app_env, "prod")
        # outside prod, localhost is fine
        load(None, {**NO_AUTH, "APP_ENV": "dev"})

    def test_redis_cluster_needs_a_database(self) -> None:
        self.refused("database_url", env={**NO_AUTH, "EVENT_BUS": "redis-cluster", "REDIS_CLUSTER_HOST": "r1"},
                     contains="required")
        settings = load(None, {**NO_AUTH, "EVENT_BUS": "redis-cluster", "REDIS_CLUSTER_NODES": "r1:7000,r2:7001",
                               "DATABASE_URL": "postgresql://db/autogpt"})
        self.assertEqual(settings.redis_cluster_nodes, ("r1:7000", "r2:7001"))
        self.refused("redis_cluster_nodes", env={**NO_AUTH, "REDIS_CLUSTER_NODES": "r1"}, contains="host:port")

    def test_minimums_and_choices(self) -> None:
        self.refused("workers", overrides={"workers": "0"}, contains="below the minimum")
        self.refused("shutdown_timeout", overrides={"shutdown_timeout": "-1"})
        self.refused("log_level", overrides={"log_level": "loud"}, contains="debug, info")
        self.refused("log_format", overrides={"log_format": "xml"})
        self.refused("max_inbound_frame", env={**NO_AUTH, "WS_MAX_MESSAGE_SIZE": "64 parsecs"}, contains="size")
        self.refused("rate_limit", file=self.write("rate_limit: [1]\n"), contains="not a number")

    def test_redis_url_scheme_without_secrets(self) -> None:
        error = self.refused("redis_url", env={**NO_AUTH, "REDIS_URL": "http://user:hunter2@redis:6379"})
        self.assertNotIn("hunter2", str(error))

    def test_a_password_that_breaks_the_url(self) -> None:
        """A ``#``, ``?`` or ``/`` in a password ends the URL's authority
        early: refused at load, naming the setting and the cure, never
        showing what was cut off (it is part of the password)."""
        for url in ("redis://:p#ss@redis:6379", "redis://:p?ss@redis:6379", "redis://u:p/ss@redis:6379/0",
                    "redis://:12#34@redis", "rediss://:p#ss@redis"):
            error = self.refused("redis_url", env={**NO_AUTH, "REDIS_URL": url}, contains="percent-encode")
            self.assertIn("%23", str(error))
            self.assertNotIn("ss@", str(error))
            self.assertNotIn("34@", str(error))
        self.refused("redis_url", env={**NO_AUTH, "REDIS_URL": "redis://cache:6379/zero"}, contains="database number")
        for url in ("postgresql://u:pa#ss@db:5432/x?schema=platform", "postgresql://u:pa?ss@db:5432/x",
                    "postgres://u:12#34@db/x"):
            error = self.refused("database_url", env={**NO_AUTH, "DATABASE_URL": url}, contains="percent-encode")
            self.assertNotIn("ss@", str(error))
        self.refused("database_url", env={**NO_AUTH, "DATABASE_URL": "mysql://db/autogpt"}, contains="postgresql://")
        # percent-encoded, both load, and the password is decoded where it is used
        settings = load(None, {**NO_AUTH, "REDIS_URL": "redis://:p%23ss@redis:6379/2",
                               "DATABASE_URL": "postgresql://u:pa%23ss@db:5432/x?schema=platform"})
        self.assertEqual((config.redis_address(settings)["password"], config.redis_address(settings)["db"]),
                         ("p#ss", 2))
        load(None, {**NO_AUTH, "REDIS_URL": "redis://redis", "DATABASE_URL": "postgresql:///autogpt?host=/run/pg"})

    def test_numbers_must_be_finite(self) -> None:
        """nan passes every bound (nan < minimum is False) and inf overflows
        the timers: AUTOGPT_WS_SHUTDOWN_TIMEOUT=nan failed only at stop."""
        for raw in ("nan", "NaN", "inf", "-inf", "1e999"):
            self.refused("shutdown_timeout", env={**NO_AUTH, "AUTOGPT_WS_SHUTDOWN_TIMEOUT": raw},
                         contains="not a finite number")
        self.refused("rate_limit", file=self.write("rate_limit: .nan\n"), contains="not a finite number")
        self.refused("catchup_handover", overrides={"catchup_handover": float("inf")}, contains="not a finite number")
        self.refused("ping_interval", file=self.write(f"ping_interval: {10 ** 400}\n"), contains="not a number")


class Sources(Base):
    """FIELDS is the single source: Settings, config.yaml and the docs/operations.md
    table follow it."""

    def test_settings_match_fields(self) -> None:
        names = [f.name for f in dataclasses.fields(Settings)]
        self.assertEqual(names, [f.key for f in FIELDS])
        hints = typing.get_type_hints(Settings)
        expected = {"str": str, "bool": bool, "int": int, "float": float, "size": int, "list": tuple[str, ...]}
        for field in FIELDS:
            self.assertEqual(hints[field.key], expected[field.kind], field.key)
            self.assertEqual(getattr(Settings, field.key), field.default, field.key)
            self.assertTrue(field.doc and "\n" not in field.doc, field.key)
            self.assertTrue(field.env, field.key)

    def test_each_default_is_valid(self) -> None:
        for field in FIELDS:
            self.assertEqual(config._convert(field, field.default, "default"), field.default, field.key)
            self.assertEqual(config._convert(field, yaml.safe_load(config.format_default(field)), "default"), field.default, field.key)

    def test_environment_names_unique(self) -> None:
        names = [name for field in FIELDS for name in field.env]
        self.assertEqual(len(names), len(set(names)))

    def test_autogpt_names(self) -> None:
        env = {name: field.key for field in FIELDS for name in field.env}
        for name, key in {
            "WEBSOCKET_SERVER_HOST": "host", "WEBSOCKET_SERVER_PORT": "port", "ENABLE_AUTH": "enable_auth",
            "JWT_VERIFY_KEY": "jwt_verify_key", "SUPABASE_JWT_SECRET": "jwt_verify_key",
            "JWT_SIGN_ALGORITHM": "jwt_sign_algorithm", "JWT_JWKS_URL": "jwt_jwks_url",
            "JWT_JWKS_ALGORITHMS": "jwt_jwks_algorithms", "REDIS_HOST": "redis_host", "REDIS_PORT": "redis_port",
            "REDIS_PASSWORD": "redis_password", "BACKEND_CORS_ALLOW_ORIGINS": "cors_allow_origins",
            "EXECUTION_EVENT_BUS_NAME": "execution_event_bus_name",
            "NOTIFICATION_EVENT_BUS_NAME": "notification_event_bus_name", "ENABLE_METRICS": "enable_metrics",
            "MAX_MESSAGE_SIZE_LIMIT": "max_message_size_limit", "APP_ENV": "app_env",
        }.items():
            self.assertEqual(env.get(name), key, name)

    def test_config_yaml_is_generated_text(self) -> None:
        path = os.path.join(ROOT, "config.yaml")
        with open(path, encoding="utf-8") as handle:
            on_disk = handle.read()
        self.assertEqual(on_disk, config.render_yaml(),
                         "config.yaml is stale: python -m autogpt_ws.config --yaml > config.yaml")

    def test_operations_table_is_generated_text(self) -> None:
        with open(os.path.join(ROOT, "docs", "operations.md"), encoding="utf-8") as handle:
            readme = handle.read()
        self.assertIn(config.render_markdown(), readme,
                      "the settings table of docs/operations.md is stale: python -m autogpt_ws.config --markdown")

    def test_config_yaml_loads_to_defaults(self) -> None:
        path = os.path.join(ROOT, "config.yaml")
        with open(path, encoding="utf-8") as handle:
            data = yaml.safe_load(handle)
        self.assertEqual(list(data), [f.key for f in FIELDS])
        for field in FIELDS:
            self.assertEqual(config._convert(field, data[field.key], path), field.default, field.key)
        self.assertEqual(load(path, NO_AUTH), load(None, NO_AUTH))

    def test_yaml_has_one_comment_per_setting(self) -> None:
        text = config.render_yaml()
        for field in FIELDS:
            marker = f"\n{field.key}: "
            self.assertIn(marker, text)
            before = text[:text.index(marker)].rsplit("\n", 1)[-1]
            self.assertTrue(before.startswith("# ") and field.env[0] in before, field.key)

    def test_markdown_table(self) -> None:
        lines = config.render_markdown().splitlines()
        self.assertEqual(lines[0], "| setting | environment | default | meaning |")
        self.assertEqual(len(lines), 2 + len(FIELDS))
        for line, field in zip(lines[2:], FIELDS):
            self.assertTrue(line.startswith(f"| `{field.key}` | `{field.env[0]}`"), line)
            self.assertEqual(line.count(" | "), 3, line)

    def test_module_main(self) -> None:
        import io
        from contextlib import redirect_stderr, redirect_stdout

        out = io.StringIO()
        with redirect_stdout(out):
            self.assertEqual(config.main(["--yaml"]), 0)
        self.assertEqual(out.getvalue(), config.render_yaml())
        out = io.StringIO()
        with redirect_stdout(out):
            self.assertEqual(config.main(["--markdown"]), 0)
        self.assertEqual(out.getvalue(), config.render_markdown())
        with redirect_stderr(io.StringIO()):
            self.assertEqual(config.main([]), 2)


class BusChoice(Base):
    """event_bus auto: the embedded bus unless something names a Redis; then
    the server asks that Redis (AutoGPT's deployments name no bus)."""

    def bus(self, env: dict[str, str], file_text: str | None = None, **overrides: Any) -> str:
        path = None
        if file_text is not None:
            path = self.mktemp()
            with open(path, "w", encoding="utf-8") as handle:
                handle.write(file_text)
        return load(path, {**NO_AUTH, **env}, overrides).event_bus

    def test_nothing_named_is_the_embedded_bus(self) -> None:
        self.assertEqual(self.bus({}), "memory")
        self.assertEqual(self.bus({"REDIS_HOST": ""}), "memory")  # an empty variable names nothing
        self.assertEqual(self.bus({}, config.render_yaml()), "memory")  # every default, listed
        self.assertEqual(self.bus({}, "redis_host: localhost\nredis_port: 6379\n"), "memory")

    def test_a_redis_named_anywhere_is_asked(self) -> None:
        for env in ({"REDIS_HOST": "redis-0", "REDIS_PORT": "17000"}, {"REDIS_HOST": "localhost"},
                    {"REDIS_PORT": "6380"}, {"REDIS_URL": "redis://cache:6379"}, {"REDIS_CLUSTER_HOST": "c"},
                    {"REDIS_CLUSTER_NODES": "c1:7000"}):
            self.assertEqual(self.bus(env), "auto", env)
        self.assertEqual(self.bus({}, "redis_host: redis-0\n"), "auto")
        self.assertEqual(self.bus({}, redis_host="127.0.0.1"), "auto")

    def test_a_named_bus_wins(self) -> None:
        self.assertEqual(self.bus({"REDIS_HOST": "redis-0", "EVENT_BUS": "memory"}), "memory")
        self.assertEqual(self.bus({"REDIS_HOST": "redis-0", "EVENT_BUS": "redis"}), "redis")
        self.assertEqual(self.bus({"REDIS_HOST": "redis-0"}, event_bus="redis"), "redis")
        self.assertEqual(self.bus({}, "event_bus: redis\n"), "redis")

    def test_cluster_seed_as_the_autogpt_server_takes_it(self) -> None:
        def seed(**env: str) -> tuple[str, int]:
            return config.redis_seed(load(None, {**NO_AUTH, **env}))

        self.assertEqual(seed(REDIS_HOST="redis-0", REDIS_PORT="17000"), ("redis-0", 17000))
        self.assertEqual(seed(REDIS_HOST="redis-0", REDIS_PORT="17000", REDIS_CLUSTER_HOST="rc",
                              REDIS_CLUSTER_PORT="7000"), ("rc", 7000))
        # each variable falls back on its own, as upstream's os.getenv chains do
        self.assertEqual(seed(REDIS_HOST="redis-0", REDIS_PORT="17000", REDIS_CLUSTER_HOST="rc"), ("rc", 17000))
        self.assertEqual(seed(REDIS_HOST="redis-0", REDIS_CLUSTER_PORT="7001"), ("redis-0", 7001))
        self.assertEqual(seed(REDIS_URL="redis://:pw@cache:6390/0"), ("cache", 6390))
        self.assertEqual(seed(), ("localhost", 6379))

    def test_autogpt_defaults_of_the_websocket_service(self) -> None:
        settings = load(None, {"JWT_JWKS_URL": "http://frontend:3000/api/auth/jwks"})
        self.assertEqual((settings.auth_failure, settings.token_expiry_close, settings.execution_not_found_reply,
                          settings.redis_use_announced_address, settings.jwt_jwks_algorithms),
                         ("http", False, True, False, ("ES256", "RS256", "EdDSA")))
        settings = load(None, {**NO_AUTH, "REDIS_USE_ANNOUNCED_ADDRESS": "true"})
        self.assertTrue(settings.redis_use_announced_address)
