"""The image's HEALTHCHECK: GET /health on the server's own listener.

Reads the same settings as the server (environment, or the file named by
AUTOGPT_WS_CONFIG), so it follows WEBSOCKET_SERVER_PORT, WEBSOCKET_SERVER_HOST
and AUTOGPT_WS_LISTEN (tcp:, ssl: and unix: endpoints).  Exit status 0 when
the server answers 200, 1 otherwise (with one line saying why).
"""

from __future__ import annotations

import http.client
import re
import socket
import ssl
import sys

from autogpt_ws.config import ConfigError, Settings, config_file_from, load

TIMEOUT = 4.0
WILDCARDS = {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1"}


class UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str) -> None:
        super().__init__("localhost", timeout=TIMEOUT)
        self.path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(TIMEOUT)
        self.sock.connect(self.path)


def connection(settings: Settings) -> http.client.HTTPConnection:
    """A connection to where the server listens (its endpoint string)."""
    kind, _, rest = settings.endpoint.partition(":")
    parts = [part.replace("\\:", ":") for part in re.split(r"(?<!\\):", rest)]
    positional = [part for part in parts if "=" not in part]
    options = dict(part.split("=", 1) for part in parts if "=" in part)
    if kind == "unix":
        return UnixConnection(options.get("address", positional[0] if positional else ""))
    port = int(options.get("port", positional[0] if positional else settings.port))
    interface = options.get("interface", "")
    host = WILDCARDS.get(interface, interface)
    if kind == "ssl":
        # a health check of our own listener: the certificate is not the question
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        return http.client.HTTPSConnection(host, port, timeout=TIMEOUT, context=context)
    return http.client.HTTPConnection(host, port, timeout=TIMEOUT)


def main() -> int:
    try:
        settings = load(config_file_from(None))
        conn = connection(settings)
        conn.request("GET", "/health")
        status = conn.getresponse().status
    except (ConfigError, OSError, ValueError, http.client.HTTPException) as exc:
        print(f"unhealthy: {exc}")
        return 1
    if status != 200:
        print(f"unhealthy: /health answered {status}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
