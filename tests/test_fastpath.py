"""The hot paths: ignored events dropped from the channel bytes alone,
frames coalesced into one write per socket per turn, Autobahn's debug
formatting made lazy.  Behaviour only; speed is for benchmarks/."""

import json
import os
from typing import Any

import autobahn.twisted.websocket as twisted_websocket
import autobahn.websocket.protocol as websocket_protocol
from autobahn.util import hltype
from twisted.internet.defer import inlineCallbacks
from twisted.trial.unittest import TestCase

from autogpt_ws.core import wire
from autogpt_ws.core.channels import Layout
from autogpt_ws.core.hub import Hub
from autogpt_ws.core.router import GRAPH_MARK, Router
from autogpt_ws.producing import publish
from autogpt_ws.sockets import lazylog
from autogpt_ws.stats import Stats
from tests.helpers import U, connect, sleep, start_server

LAYOUT = Layout()


class Sink:
    def __init__(self, user_id: str) -> None:
        self.user_id = user_id
        self.keys: set[str] = set()
        self.frames: list[bytes] = []

    def push(self, frame: wire.OutFrame) -> None:
        self.frames.append(frame.payload)


class Recorder:
    def __init__(self) -> None:
        self.recorded: list[tuple[str, str, str, str, bytes]] = []

    def record(self, *args: Any) -> None:
        self.recorded.append(args)


def node(user: str, exec_id: str = "e1") -> tuple[bytes, bytes]:
    event = publish.node_event(user, "g1", exec_id, "ne", "RUNNING")
    return LAYOUT.classic_exec(user, "g1", exec_id).encode(), publish.envelope(event)


class IgnoredFromChannelBytes(TestCase):
    def setUp(self) -> None:
        self.hub, self.stats = Hub(), Stats()
        self.opened = 0
        original = wire.open_envelope

        def counting(data: bytes) -> Any:
            self.opened += 1
            return original(data)

        self.patch(wire, "open_envelope", counting)

    def test_user_with_no_socket_is_not_decoded(self) -> None:
        router = Router(self.hub, self.stats, LAYOUT)
        for index in range(50):
            router.classic_bytes(*node(f"stranger-{index}"))
        self.assertEqual((self.stats.events_received, self.stats.events_ignored, self.opened), (50, 50, 0))

    def test_users_are_tracked_as_sockets_come_and_go(self) -> None:
        router = Router(self.hub, self.stats, LAYOUT)
        sink = Sink("alice")
        self.hub.attach(sink)
        self.hub.subscribe(sink, wire.exec_key("alice", "e1"))
        router.classic_bytes(*node("alice"))
        self.assertEqual(len(sink.frames), 1)
        self.hub.detach(sink)
        router.classic_bytes(*node("alice"))
        self.assertEqual((self.stats.events_ignored, self.opened), (1, 1))

    def test_graph_events_of_absent_users_still_reach_the_cache(self) -> None:
        cache = Recorder()
        router = Router(self.hub, self.stats, LAYOUT, graph_events=cache)
        event = publish.graph_event("bob", "g1", "e9", "COMPLETED")
        router.classic_bytes(LAYOUT.classic_exec("bob", "g1", "e9").encode(), publish.envelope(event))
        router.classic_bytes(*node("bob"))  # a node event of the same absent user: skipped undecoded
        self.assertEqual([r[:4] for r in cache.recorded], [("bob", "g1", "e9", "COMPLETED")])
        self.assertEqual(self.opened, 1)

    def test_odd_channels_take_the_full_path(self) -> None:
        router = Router(self.hub, self.stats, LAYOUT)
        router.classic_bytes(b"execution_event/u/g/e/extra", b"{}")
        router.classic_bytes(b"notification_event/nobody", b"{}")
        self.assertEqual(self.stats.events_dropped["bad_channel"], 1)
        self.assertEqual(self.stats.events_ignored, 1)  # the notification: nobody here

    def test_node_events_are_recognised_by_their_ends(self) -> None:
        """A node event of an absent user is recognised by either end and
        skipped undecoded, even when its data mentions graph events."""
        cache = Recorder()
        router = Router(self.hub, self.stats, LAYOUT, graph_events=cache)
        nested = {"output": ["graph_execution_update"]}
        tail_last = publish.envelope(publish.node_event(U, "g1", "e1", "n", "RUNNING", output_data=nested))
        head_first = (b'{"payload":{"event_type":"node_execution_update","user_id":"%s","output_data":'
                      b'{"output":["graph_execution_update"]}}}' % U.encode())
        self.assertTrue(tail_last.endswith(b'"event_type":"node_execution_update"}}'))
        for data in (tail_last, head_first):
            self.assertIn(GRAPH_MARK, data)
            router.classic_bytes(LAYOUT.classic_exec(U, "g1", "e1").encode(), data)
        self.assertEqual((self.stats.events_ignored, self.opened, cache.recorded), (2, 0, []))
        # neither end: scanned, decoded, recognised and still not recorded
        router.classic_bytes(LAYOUT.classic_exec(U, "g1", "e1").encode(), b'{"payload":' + tail_last[11:-2] + b',"x":1}}')
        self.assertEqual((self.opened, cache.recorded), (1, []))


class OneWritePerTurn(TestCase):
    @inlineCallbacks
    def test_frames_of_one_turn_leave_together_and_in_order(self) -> None:
        server = start_server(self, catchup_enabled=False)
        client = yield connect(server.port, test=self)
        yield client.request('{"method":"subscribe_graph_execution","data":{"graph_exec_id":"e1"}}')
        (proto,) = server.factory.sockets
        writes: list[bytes] = []
        real_write = proto.transport.write
        self.patch(proto.transport, "write", lambda data: (writes.append(data), real_write(data)))
        sent: list[int] = []
        self.patch(proto.transport, "socket", _CountingSocket(proto.transport.socket, sent))
        for index in range(50):
            server.bus.publish(LAYOUT.classic_exec(U, "g1", "e1"),
                               publish.envelope(publish.node_event(U, "g1", "e1", f"ne-{index}", "RUNNING")))
        self.assertEqual(len(proto._out), 50)  # queued, nothing written yet this turn
        yield client.message(50)
        self.assertEqual(len(sent) + len(writes), 1, "one write for the turn's 50 frames")
        received = [json.loads(m)["data"]["node_exec_id"] for m in client.messages[1:]]
        self.assertEqual(received, [f"ne-{i}" for i in range(50)])

    @inlineCallbacks
    def test_a_reply_goes_after_the_events_queued_before_it(self) -> None:
        server = start_server(self, catchup_enabled=False)
        client = yield connect(server.port, test=self)
        yield client.request('{"method":"subscribe_graph_execution","data":{"graph_exec_id":"e1"}}')
        (proto,) = server.factory.sockets
        server.bus.publish(LAYOUT.classic_exec(U, "g1", "e1"),
                           publish.envelope(publish.node_event(U, "g1", "e1", "ne-0", "RUNNING")))
        proto.send_reply(wire.HEARTBEAT_REPLY)  # while the event is still queued
        yield client.message(2)
        self.assertEqual(json.loads(client.messages[1])["method"], "node_execution_event")
        self.assertEqual(client.messages[2], wire.HEARTBEAT_REPLY)
        yield sleep(0)


class _CountingSocket:
    def __init__(self, sock: Any, sent: list[int]) -> None:
        self._sock = sock
        self._sent = sent

    def send(self, data: bytes) -> int:
        self._sent.append(len(data))
        return int(self._sock.send(data))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)


class LazyDebugFormatting(TestCase):
    def test_autobahn_helpers_format_lazily_with_the_same_text(self) -> None:
        lazylog.install()
        lazylog.install()  # idempotent
        for module in (websocket_protocol, twisted_websocket):
            value = module.hltype(self.test_autobahn_helpers_format_lazily_with_the_same_text)
            self.assertIsInstance(value, lazylog.Lazy)
            self.assertEqual(f"{value}", hltype(self.test_autobahn_helpers_format_lazily_with_the_same_text))
        self.assertEqual(str(websocket_protocol.pformat({"a": 1})), "{'a': 1}")

    def test_nothing_is_computed_unless_formatted(self) -> None:
        calls: list[int] = []
        value = lazylog.lazy(lambda: calls.append(1) or "x")()
        self.assertEqual(calls, [])
        self.assertEqual(f"{value:>3}", "  x")
        self.assertEqual(calls, [1])


def self_signed(directory: str) -> tuple[str, str]:
    """A key and a self-signed certificate for 127.0.0.1, as PEM files."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
            .sign(key, hashes.SHA256()))
    key_path, cert_path = os.path.join(directory, "key.pem"), os.path.join(directory, "cert.pem")
    with open(key_path, "wb") as handle:
        handle.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    with open(cert_path, "wb") as handle:
        handle.write(cert.public_bytes(serialization.Encoding.PEM))
    return key_path, cert_path


class FrontDoorRouting(TestCase):
    @inlineCallbacks
    def test_upgrade_skips_twisted_web(self) -> None:
        server = start_server(self)
        requests: list[Any] = []
        factory = server.site.requestFactory
        self.patch(server.site, "requestFactory", lambda *a, **k: requests.append(1) or factory(*a, **k))
        client = yield connect(server.port, test=self)
        reply = yield client.request('{"method":"heartbeat","data":"ping","success":true}')
        self.assertEqual(reply, wire.HEARTBEAT_REPLY)
        self.assertEqual(requests, [])
        (proto,) = server.factory.sockets
        self.assertIs(proto.transport.protocol, proto)
        self.assertIs(proto.transport.producer, proto)

    @inlineCallbacks
    def test_other_requests_go_to_twisted_web(self) -> None:
        from tests.helpers import http_get, raw_request, upgrade_request

        server = start_server(self)
        status, body = yield http_get(server.port, "/health")
        self.assertEqual((status, body), (200, b'{"status":"healthy"}'))
        status, _ = yield http_get(server.port, "/wsx")
        self.assertEqual(status, 404)
        # an upgrade for another path is twisted.web's: 404, not a socket
        answer = yield raw_request(server.port, upgrade_request("/other"), until=lambda b: b"\r\n\r\n" in b)
        self.assertTrue(answer.startswith(b"HTTP/1.1 404"), answer[:40])

    @inlineCallbacks
    def test_request_line_split_across_packets(self) -> None:
        from twisted.internet import reactor
        from twisted.internet.endpoints import TCP4ClientEndpoint
        from twisted.internet.protocol import Factory, Protocol

        from tests.helpers import upgrade_request

        server = start_server(self)
        request = upgrade_request("/ws?token=x")

        received: list[bytes] = []

        class Slow(Protocol):
            def dataReceived(self, data: bytes) -> None:
                received.append(data)

        proto = yield TCP4ClientEndpoint(reactor, "127.0.0.1", server.port).connect(Factory.forProtocol(Slow))
        for index in range(0, 12, 3):  # "GET /ws?toke" in four pieces
            proto.transport.write(request[index:index + 3])
            yield sleep(0.02)
        proto.transport.write(request[12:])
        for _ in range(200):
            if b"\r\n\r\n" in b"".join(received):
                break
            yield sleep(0.01)
        self.assertTrue(b"".join(received).startswith(b"HTTP/1.1 101"), received[:1])
        proto.transport.abortConnection()
        yield sleep(0.05)

    @inlineCallbacks
    def test_tls_listener(self) -> None:
        from autobahn.twisted.websocket import WebSocketClientFactory
        from twisted.internet import reactor, ssl
        from twisted.internet.defer import Deferred
        from twisted.internet.endpoints import SSL4ClientEndpoint

        from tests.helpers import Client, free_port, make_settings

        directory = self.mktemp()
        os.makedirs(directory)
        key, cert = self_signed(directory)
        port = free_port()
        server = start_server(self, make_settings(listen=f"ssl:{port}:interface=127.0.0.1:privateKey={key}:certKey={cert}"))
        with open(cert, "rb") as handle:
            trust = ssl.Certificate.loadPEM(handle.read())
        factory = WebSocketClientFactory(f"wss://127.0.0.1:{port}/ws", reactor=reactor)
        factory.protocol = Client
        factory.opened = Deferred()
        factory.setProtocolOptions(autoPingInterval=0)
        endpoint = SSL4ClientEndpoint(reactor, "127.0.0.1", port, ssl.optionsForClientTLS("127.0.0.1", trust))
        yield endpoint.connect(factory)
        client = yield factory.opened
        self.addCleanup(client.disconnect)
        reply = yield client.request('{"method":"subscribe_graph_execution","data":{"graph_exec_id":"e1"}}')
        self.assertIn(b'"success":true', reply)
        server.bus.publish(LAYOUT.classic_exec(U, "g1", "e1"),
                           publish.envelope(publish.node_event(U, "g1", "e1", "ne-0", "RUNNING")))
        pushed = yield client.message(1)
        self.assertIn(b'"node_exec_id":"ne-0"', pushed)


class VerifyWithoutWaiting(TestCase):
    def test_secret_and_disabled_verifiers_answer_at_once(self) -> None:
        from autogpt_ws.sockets.auth import AuthFailure, DisabledVerifier, SecretVerifier
        from tests.helpers import SECRET, token

        verifier = SecretVerifier(SECRET, "HS256", "authenticated", 0)
        self.assertEqual(verifier.verify_now(token(sub="alice")).user_id, "alice")
        with self.assertRaises(AuthFailure) as missing:
            verifier.verify_now("")
        self.assertEqual(missing.exception.code, 4001)
        with self.assertRaises(AuthFailure) as bad:
            verifier.verify_now(token(sub="alice", key="another-secret-that-is-long-enough-0123456789"))
        self.assertEqual((bad.exception.code, bad.exception.reason), (4003, "Invalid token"))
        self.assertEqual(DisabledVerifier().verify_now(None).user_id, U)
