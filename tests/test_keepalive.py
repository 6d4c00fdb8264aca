"""Keepalive and token lifetime (issue 5, points 3 and 4): protocol pings
on an interval, a socket that does not answer is dropped, the application
heartbeat works alongside; a socket whose token carries ``exp`` is closed
4003 ``Token expired`` at exp + grace, unless switched off."""

from __future__ import annotations

import time
from typing import Any

from twisted.internet.defer import inlineCallbacks
from twisted.internet.task import Clock
from twisted.trial.unittest import TestCase

from autogpt_ws.running.service import WebsocketServer
from tests.helpers import SECRET, RawClient, make_settings, raw_connect, sleep, start_server, token, wait_for

HEARTBEAT = '{"method":"heartbeat","data":"ping","success":true}'
PONG = b'{"method":"heartbeat","data":"pong","success":true}'


class Keepalive(TestCase):
    @inlineCallbacks
    def test_socket_not_answering_pings_is_dropped(self) -> None:
        server = start_server(self, ping_interval=0.2, ping_timeout=0.2)
        client: RawClient = yield raw_connect(server.port, answer_pings=False, test=self)
        yield client.lost
        self.assertGreaterEqual(client.pings, 1)
        self.assertEqual(server.stats.sockets_closed["1006"], 1)  # dropped: no closing handshake
        self.assertEqual(server.stats.open_sockets, 0)

    @inlineCallbacks
    def test_answering_socket_stays_and_heartbeat_works_alongside(self) -> None:
        server = start_server(self, ping_interval=0.2, ping_timeout=0.2)
        client: RawClient = yield raw_connect(server.port, test=self)
        silent: RawClient = yield raw_connect(server.port, answer_pings=False, test=self)
        replies = []
        deadline = time.monotonic() + 20
        while client.pings < 5:
            self.assertLess(time.monotonic(), deadline, f"only {client.pings} pings came")
            replies.append((yield client.request(HEARTBEAT)))
            yield sleep(0.05)
        self.assertEqual(set(replies), {PONG})
        yield silent.lost  # the control, on the same server, was dropped meanwhile
        self.assertFalse(client.lost.called)
        self.assertIsNone(client.close_code)
        self.assertEqual((yield client.request(HEARTBEAT)), PONG)

    @inlineCallbacks
    def test_no_pings_when_interval_is_zero(self) -> None:
        server = start_server(self, ping_interval=0, ping_timeout=0.2)
        client: RawClient = yield raw_connect(server.port, answer_pings=False, test=self)
        yield sleep(1.0)
        self.assertEqual(client.pings, 0)
        self.assertEqual((yield client.request(HEARTBEAT)), PONG)


AUTH = {"enable_auth": True, "jwt_verify_key": SECRET, "token_expiry_close": True}


class TokenLifetime(TestCase):
    """exp is checked on the factory's clock: a task.Clock set to the wall
    time lets a test step over the deadline exactly."""

    def server(self, **overrides: Any) -> tuple[WebsocketServer, Clock]:
        server = start_server(self, **{**AUTH, **overrides})
        clock = Clock()
        clock.advance(time.time())
        server.factory.clock = clock
        return server, clock

    @inlineCallbacks
    def open_until(self, client: RawClient, clock: Clock, at: float) -> Any:
        clock.advance(at - clock.seconds())
        self.assertEqual((yield client.request(HEARTBEAT)), PONG)
        self.assertIsNone(client.close_code)

    @inlineCallbacks
    def test_closed_4003_at_exp(self) -> None:
        server, clock = self.server()
        exp = int(time.time()) + 60
        client = yield raw_connect(server.port, path=f"/ws?token={token(exp=exp)}", test=self)
        yield self.open_until(client, clock, exp - 0.01)
        clock.advance(0.01)
        yield client.lost
        self.assertEqual((client.close_code, client.close_reason), (4003, "Token expired"))
        self.assertEqual(server.stats.sockets_closed["4003"], 1)

    @inlineCallbacks
    def test_grace(self) -> None:
        server, clock = self.server(token_expiry_grace=30)
        exp = int(time.time()) + 60
        client = yield raw_connect(server.port, path=f"/ws?token={token(exp=exp)}", test=self)
        yield self.open_until(client, clock, exp + 29.9)
        clock.advance(0.1)
        yield client.lost
        self.assertEqual((client.close_code, client.close_reason), (4003, "Token expired"))

    @inlineCallbacks
    def test_off_by_default(self) -> None:
        """The AutoGPT server never re-checks a token on an open socket."""
        self.assertFalse(make_settings().token_expiry_close)
        server, clock = self.server(token_expiry_close=False)
        exp = int(time.time()) + 60
        client = yield raw_connect(server.port, path=f"/ws?token={token(exp=exp)}", test=self)
        yield self.open_until(client, clock, exp + 3600)

    @inlineCallbacks
    def test_token_without_exp_never_expires(self) -> None:
        server, clock = self.server()
        client = yield raw_connect(server.port, path=f"/ws?token={token(exp=None)}", test=self)
        yield self.open_until(client, clock, clock.seconds() + 10 * 365 * 86400)

    @inlineCallbacks
    def test_real_clock(self) -> None:
        """A short-lived token on the real reactor: the socket is closed
        by itself, once exp has passed."""
        server = start_server(self, **AUTH)
        exp = int(time.time()) + 2
        client = yield raw_connect(server.port, path=f"/ws?token={token(exp=exp)}", test=self)
        self.assertEqual((yield client.request(HEARTBEAT)), PONG)
        yield wait_for(lambda: client.lost.called, timeout=10)
        self.assertGreaterEqual(time.time(), exp)
        self.assertEqual((client.close_code, client.close_reason), (4003, "Token expired"))


class FakeSocket:
    """What the keepalive sees of a socket."""

    def __init__(self) -> None:
        self.sent: list[bytes] = []
        self.aborted = False
        self.on_send: Any = None

    def sendData(self, data: bytes, sync: bool = False, chopsize: int | None = None) -> None:
        self.sent.append(data)
        if self.on_send is not None:
            self.on_send(data)

    def abort(self) -> None:
        self.aborted = True


class Wheel(TestCase):
    """The one timer behind every socket's pings (autogpt_ws.sockets.keepalive)."""

    def setUp(self) -> None:
        from autogpt_ws.sockets.keepalive import PING, Keepalive

        self.PING = PING
        self.clock = Clock()
        # spread 0.5: a socket's first ping is due exactly one interval after it opens
        self.keepalive = Keepalive(self.clock, interval=20.0, timeout=10.0, spread=lambda: 0.5)
        self.keepalive.start()
        self.addCleanup(self.keepalive.stop)

    def advance(self, seconds: float) -> None:
        for _ in range(int(round(seconds / self.keepalive.tick))):
            self.clock.advance(self.keepalive.tick)

    def test_ping_then_pong_then_ping_again(self) -> None:
        sock = FakeSocket()
        self.keepalive.add(sock)  # type: ignore[arg-type]
        self.advance(19.75)
        self.assertEqual(sock.sent, [])
        self.advance(0.25)
        self.assertEqual(sock.sent, [self.PING])
        self.advance(5)
        self.keepalive.pong(sock)  # type: ignore[arg-type]
        self.advance(19.75)
        self.assertEqual(sock.sent, [self.PING])
        self.advance(0.25)
        self.assertEqual((sock.sent, sock.aborted), ([self.PING, self.PING], False))

    def test_no_pong_by_the_deadline_is_dropped(self) -> None:
        sock = FakeSocket()
        self.keepalive.add(sock)  # type: ignore[arg-type]
        self.advance(29.75)
        self.assertFalse(sock.aborted)
        self.advance(0.25)
        self.assertTrue(sock.aborted)
        self.assertEqual((self.keepalive.pings, self.keepalive.dropped), (1, 1))

    def test_a_removed_socket_is_never_touched(self) -> None:
        sock = FakeSocket()
        self.keepalive.add(sock)  # type: ignore[arg-type]
        self.keepalive.remove(sock)  # type: ignore[arg-type]
        self.advance(60)
        self.assertEqual((sock.sent, sock.aborted), ([], False))

    def test_one_timer_whatever_the_number_of_sockets(self) -> None:
        """Autobahn's auto-ping made two timers per socket per ping: new
        long-lived objects every interval for the garbage collector."""
        socks = [FakeSocket() for _ in range(1000)]
        for sock in socks:
            self.keepalive.add(sock)  # type: ignore[arg-type]
        for _ in range(5):
            self.advance(20)
            for sock in socks:
                self.keepalive.pong(sock)  # type: ignore[arg-type]
            self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        self.assertEqual({(len(sock.sent), sock.aborted) for sock in socks}, {(5, False)})

    def test_a_late_turn_catches_up(self) -> None:
        """A reactor busy for a while: every slot passed is walked."""
        sock = FakeSocket()
        self.keepalive.add(sock)  # type: ignore[arg-type]
        self.clock.advance(45)  # one turn for 45 s: the ping due at 20 s goes now
        self.assertEqual((sock.sent, sock.aborted), ([self.PING], False))
        self.advance(9.75)
        self.assertFalse(sock.aborted)
        self.advance(0.25)
        self.assertTrue(sock.aborted)  # its deadline counts from when it was sent

    def test_sockets_opened_together_ping_apart(self) -> None:
        """Sockets that opened in the same instant (browsers reconnecting
        after a restart) have their first pings spread over one interval,
        and keep that spread: no turn pings more than twice its share of them, where
        without the spread one turn would ping all 2,000 (measured: reactor
        stalls of 30-40 ms at 19,500 sockets, benchmarks/curve.py)."""
        import random

        from autogpt_ws.sockets.keepalive import Keepalive

        keepalive = Keepalive(self.clock, interval=20.0, timeout=10.0, spread=random.Random(7).random)
        keepalive.start()
        self.addCleanup(keepalive.stop)
        socks = [FakeSocket() for _ in range(2000)]
        for sock in socks:
            keepalive.add(sock)  # type: ignore[arg-type]
        per_turn: list[int] = []
        first: dict[int, float] = {}
        for _ in range(int(70 / keepalive.tick)):  # 3.5 intervals
            before = keepalive.pings
            self.clock.advance(keepalive.tick)
            per_turn.append(keepalive.pings - before)
            for i, sock in enumerate(socks):
                if sock.sent and not sock.aborted:
                    first.setdefault(i, self.clock.seconds())
                    keepalive.pong(sock)  # type: ignore[arg-type]
        self.assertEqual(len(first), 2000)
        self.assertGreaterEqual(min(first.values()), 10.0)  # half an interval at the soonest
        self.assertLessEqual(max(first.values()), 30.0 + keepalive.tick)  # one and a half at the latest
        self.assertGreater(max(first.values()) - min(first.values()), 19.0)
        self.assertLessEqual(max(per_turn), 50)  # 25 a turn on average (2,000 over 80 turns)
        self.assertEqual({sock.aborted for sock in socks}, {False})
        self.assertGreaterEqual(min(len(sock.sent) for sock in socks), 3)

    def test_a_turn_yields_to_the_reactor_between_slices(self) -> None:
        """2,000 sockets due in one turn are pinged SLICE at a time, and
        what arrives meanwhile (here: a call made when the first ping goes
        out, as a pong or an event would) runs after the first slice, not
        after all of them.  A socket closed between slices is not touched."""
        from autogpt_ws.sockets.keepalive import SLICE

        socks = [FakeSocket() for _ in range(2000)]
        for sock in socks:
            self.keepalive.add(sock)  # type: ignore[arg-type]
        seen: list[int] = []

        def meanwhile() -> None:
            seen.append(self.keepalive.pings)
            for sock in socks:
                if not sock.sent:  # one still waiting for its ping closes
                    self.keepalive.remove(sock)  # type: ignore[arg-type]
                    closed.append(sock)
                    return

        closed: list[FakeSocket] = []

        def sent(data: bytes, *args: Any) -> None:
            if self.keepalive.pings == 1:  # the first ping of the turn is going out
                self.clock.callLater(0, meanwhile)

        for sock in socks:
            sock.on_send = sent
        self.advance(20)
        self.assertEqual(len(seen), 1)
        self.assertLessEqual(seen[0], SLICE)  # without slices: 2,000
        self.assertEqual(self.keepalive.pings, 1999)
        self.assertEqual(closed[0].sent, [])
        self.assertEqual(sorted(len(sock.sent) for sock in socks), [0] + [1] * 1999)

    def test_no_deadline(self) -> None:
        from autogpt_ws.sockets.keepalive import Keepalive

        keepalive = Keepalive(self.clock, interval=1.0, timeout=0, spread=lambda: 0.5)
        keepalive.start()
        self.addCleanup(keepalive.stop)
        sock = FakeSocket()
        keepalive.add(sock)  # type: ignore[arg-type]
        for _ in range(40):
            self.clock.advance(0.25)
        self.assertEqual((len(sock.sent), sock.aborted), (10, False))
