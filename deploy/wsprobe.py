"""A WebSocket client with nothing but the standard library, for
deploy/test-image.sh (the host running it needs no package).

    python3 wsprobe.py [--unresponsive] [--path PATH] HOST PORT FRAME...

Opens ws://HOST:PORT/ws (or PATH, which may carry ?token=...), sends each FRAME (text), then prints one line per
frame received ("text <payload>"), answers pings, and on the server's close
prints "close <code> <reason>", answers it and exits 0.  Exits 1 if the
connection ends without a close frame or nothing arrives for 60 s.
--unresponsive: answer neither pings nor the close; after the close frame,
wait for the server to drop the connection, print "dropped" and exit 0.
"""

from __future__ import annotations

import argparse
import base64
import os
import socket
import struct
import sys


def send_frame(sock: socket.socket, opcode: int, payload: bytes) -> None:
    """One masked, final frame (clients must mask)."""
    mask = os.urandom(4)
    head = bytes([0x80 | opcode])
    size = len(payload)
    if size < 126:
        head += bytes([0x80 | size])
    elif size < 1 << 16:
        head += bytes([0x80 | 126]) + struct.pack("!H", size)
    else:
        head += bytes([0x80 | 127]) + struct.pack("!Q", size)
    sock.sendall(head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload)))


def read_exact(sock: socket.socket, count: int) -> bytes:
    data = b""
    while len(data) < count:
        chunk = sock.recv(count - len(data))
        if not chunk:
            raise ConnectionError("connection closed without a close frame")
        data += chunk
    return data


def read_frame(sock: socket.socket) -> tuple[int, bytes]:
    first, second = read_exact(sock, 2)
    size = second & 0x7F
    if size == 126:
        size = struct.unpack("!H", read_exact(sock, 2))[0]
    elif size == 127:
        size = struct.unpack("!Q", read_exact(sock, 8))[0]
    return first & 0x0F, read_exact(sock, size)  # servers never mask


def handshake(sock: socket.socket, host: str, port: int, path: str) -> None:
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall(
        f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode()
    )
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = sock.recv(1)
        if not chunk:
            raise ConnectionError("connection closed during the handshake")
        head += chunk
    status = head.split(b"\r\n", 1)[0].decode()
    if " 101 " not in status + " ":
        raise ConnectionError(f"upgrade refused: {status}")


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="wsprobe.py")
    parser.add_argument("--unresponsive", action="store_true")
    parser.add_argument("--path", default="/ws")
    parser.add_argument("host")
    parser.add_argument("port", type=int)
    parser.add_argument("frames", nargs="*")
    args = parser.parse_args(argv)
    unresponsive = args.unresponsive
    closed = False
    try:
        sock = socket.create_connection((args.host, args.port), timeout=60)
        handshake(sock, args.host, args.port, args.path)
        for frame in args.frames:
            send_frame(sock, 0x1, frame.encode())
        while True:
            opcode, payload = read_frame(sock)
            if opcode == 0x1:
                print("text", payload.decode(), flush=True)
            elif opcode == 0x9 and not unresponsive:
                send_frame(sock, 0xA, payload)
            elif opcode == 0x8:
                code = struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else 1005
                print("close", code, payload[2:].decode(errors="replace"), flush=True)
                if not unresponsive:
                    send_frame(sock, 0x8, payload[:2])
                    return 0
                closed = True
    except TimeoutError:
        print("error nothing received for 60 s", flush=True)
        return 1
    except (OSError, ConnectionError) as exc:
        if closed:
            print("dropped", flush=True)
            return 0
        print("error", exc, flush=True)
        return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
