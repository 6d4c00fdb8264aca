"""Authentication at the handshake (PROTOCOL.md section 2; issue 3, point 1):
every mode x every failure, plus success, with real signed tokens, real
generated keys and a real key set served from a file and over HTTP."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import struct
import time
from functools import lru_cache
from io import StringIO
from typing import Any

import txaio
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm
from twisted.internet import reactor, task
from twisted.internet.defer import Deferred, inlineCallbacks, succeed
from twisted.logger import LogLevel, formatEvent, globalLogPublisher
from twisted.trial.unittest import TestCase
from twisted.web.resource import Resource
from twisted.web.server import Site

from autogpt_ws.config import load
from autogpt_ws.running import logs
from autogpt_ws.running.service import WebsocketServer
from autogpt_ws.sockets.auth import AuthFailure, Identity, KeySetVerifier, http_fetcher
from tests.helpers import (SECRET, Client, SilentServer, U, connect, make_settings, raw_request, start_server, token,
                           upgrade_request)

MISSING = (4001, "Missing authentication token")
NO_SUB = (4002, "Invalid token")
INVALID = (4003, "Invalid token")

HEARTBEAT = b'{"method":"heartbeat","data":"ping","success":true}'


# -- key material ---------------------------------------------------------------


class KeyPair:
    """A generated private key, its JWK (public part) and tokens signed with it."""

    _JWK = {"RS256": RSAAlgorithm, "ES256": ECAlgorithm, "EdDSA": OKPAlgorithm}

    def __init__(self, alg: str, kid: str, private: Any) -> None:
        self.alg = alg
        self.kid = kid
        self.private = private
        self.public = private.public_key()

    def jwk(self, with_alg: bool = True) -> dict[str, Any]:
        entry: dict[str, Any] = self._JWK[self.alg].to_jwk(self.public, as_dict=True)
        entry.update(kid=self.kid, use="sig")
        if with_alg:
            entry["alg"] = self.alg
        return entry

    def public_pem(self) -> str:
        return self.public.public_bytes(serialization.Encoding.PEM,
                                        serialization.PublicFormat.SubjectPublicKeyInfo).decode()

    def token(self, kid: Any = "own", alg: str | None = None, **claims: Any) -> str:
        headers = {} if kid is None else {"kid": self.kid if kid == "own" else kid}
        return token(key=self.private, algorithm=alg or self.alg, headers=headers, **claims)


@lru_cache(maxsize=None)
def keypair(name: str) -> KeyPair:
    """rsa, rsa-other, ec, ec-other, ed: generated once per test run."""
    if name.startswith("rsa"):
        return KeyPair("RS256", name, rsa.generate_private_key(public_exponent=65537, key_size=2048))
    if name.startswith("ec"):
        return KeyPair("ES256", name, ec.generate_private_key(ec.SECP256R1()))
    return KeyPair("EdDSA", name, ed25519.Ed25519PrivateKey.generate())


def jwks(*pairs: KeyPair, with_alg: bool = True) -> bytes:
    return json.dumps({"keys": [p.jwk(with_alg) for p in pairs]}).encode()


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def forge(header: dict[str, Any], claims: dict[str, Any], hmac_key: bytes | None) -> str:
    """A token PyJWT refuses to make: alg none, or HS256 keyed with a PEM
    public key (the algorithm-confusion attack)."""
    signing_input = _b64(json.dumps(header).encode()) + "." + _b64(json.dumps(claims).encode())
    signature = b"" if hmac_key is None else hmac.new(hmac_key, signing_input.encode(), hashlib.sha256).digest()
    return signing_input + "." + _b64(signature)


def claims(sub: str = "user-1", **extra: Any) -> dict[str, Any]:
    return {"sub": sub, "aud": "authenticated", "exp": int(time.time()) + 3600, **extra}


# -- servers around the key set -------------------------------------------------------


class KeySetPage(Resource):
    isLeaf = True

    def __init__(self, body: bytes) -> None:
        super().__init__()
        self.body = body
        self.requests = 0

    def render_GET(self, request: Any) -> bytes:
        self.requests += 1
        request.setHeader(b"Content-Type", b"application/json")
        return self.body


def serve_key_set(test: TestCase, body: bytes) -> tuple[KeySetPage, str]:
    """A real twisted.web server on a loopback port 0 serving ``body``."""
    page = KeySetPage(body)
    site = Site(page)
    site.noisy = False
    port = reactor.listenTCP(0, site, interface="127.0.0.1")  # type: ignore[attr-defined]
    test.addCleanup(port.stopListening)
    return page, f"http://127.0.0.1:{port.getHost().port}/jwks.json"


def serve_silence(test: TestCase) -> tuple[list[Any], str]:
    """A key-set URL whose server accepts connections and never answers."""
    silent = SilentServer(test)
    return silent.accepted, f"http://127.0.0.1:{silent.port}/jwks.json"


def close_frame(code: int, reason: str) -> bytes:
    body = struct.pack("!H", code) + reason.encode()
    return bytes((0x88, len(body))) + body


def _first_frame_complete(data: bytes) -> bool:
    head, sep, rest = data.partition(b"\r\n\r\n")
    if not sep:
        return False
    if not head.startswith(b"HTTP/1.1 101"):
        return True
    return len(rest) >= 2 and len(rest) >= 2 + (rest[1] & 0x7F)


# -- the checks -----------------------------------------------------------------


class AuthCase(TestCase):
    """Helpers: what one handshake gets, seen by a real Autobahn client
    and, where it matters, byte by byte."""

    @inlineCallbacks
    def assertClosed(self, port: int, query: str, expected: tuple[int, str], label: str = "") -> Any:
        """The handshake completes, then a close with exactly this code and
        reason, and no other frame (a frame sent meanwhile gets no answer)."""
        client = yield connect(port, query=query, test=self)
        if client.state == client.STATE_OPEN:
            client.send(HEARTBEAT)
        outcome: Deferred[Any] = Deferred()

        def closed(result: Any) -> Any:
            if not outcome.called:
                outcome.callback(result)
            return result

        def message(payload: bytes, isBinary: bool) -> None:
            Client.onMessage(client, payload, isBinary)
            if not outcome.called:
                outcome.callback(None)  # the socket answered: it is open

        client.onMessage = message  # type: ignore[method-assign]
        client.closed.addBoth(closed)
        timer = reactor.callLater(5, lambda: outcome.called or outcome.callback(None))  # type: ignore[attr-defined]
        result = yield outcome
        if timer.active():
            timer.cancel()
        if result is None:
            self.fail(f"{label or query}: not closed (received {client.messages!r})")
        code, reason = result
        self.assertEqual((code, reason), expected, label or query)
        self.assertEqual((client.messages, client.binary), ([], []), label or query)

    @inlineCallbacks
    def assertUser(self, port: int, query: str, user_id: str, label: str = "") -> Any:
        """The socket is open and belongs to ``user_id``."""
        client = yield connect(port, query=query, test=self)
        reply = yield client.request(b'{"method":"subscribe_graph_execution","data":{"graph_exec_id":"e1"}}')
        self.assertEqual(reply, ('{"method":"subscribe_graph_execution","data":null,"success":true,'
                                 '"channel":"%s|graph_exec#e1","error":null}' % user_id).encode(), label or query)
        yield client.disconnect()

    @inlineCallbacks
    def assertMatrix(self, port: int, cases: list[tuple[str, str, tuple[int, str] | str]]) -> Any:
        for label, query, outcome in cases:
            if isinstance(outcome, str):
                yield self.assertUser(port, query, outcome, label)
            else:
                yield self.assertClosed(port, query, outcome, label)


def tq(value: str) -> str:
    return "token=" + value


class DisabledMode(AuthCase):
    @inlineCallbacks
    def test_every_socket_is_the_default_user(self) -> Any:
        server = start_server(self)
        self.assertEqual(U, "3e53486c-cf57-477e-ba2a-cb02dc828e1a")
        yield self.assertMatrix(server.port, [
            ("no token", "", U),
            ("empty token", "token=", U),
            ("garbage token", "token=garbage", U),
            ("valid token of another user", tq(token("someone")), U),
            ("expired token", tq(token(exp=1)), U),
        ])


class SharedSecretMode(AuthCase):
    def server(self, **overrides: Any) -> WebsocketServer:
        return start_server(self, **{"enable_auth": True, "auth_failure": "close", "jwt_verify_key": SECRET,
                                     **overrides})

    @inlineCallbacks
    def test_matrix(self) -> Any:
        server = self.server()
        now = int(time.time())
        rsa_pair, ec_pair = keypair("rsa"), keypair("ec")
        yield self.assertMatrix(server.port, [
            ("valid", tq(token("user-1")), "user-1"),
            ("audience in a list", tq(token("user-2", aud=["other", "authenticated"])), "user-2"),
            ("no exp", tq(token("user-3", exp=None)), "user-3"),
            ("nbf and iat in the past", tq(token("user-4", nbf=now - 10, iat=now - 10)), "user-4"),
            ("non-ASCII sub", tq(token("usér-☃")), "usér-☃"),
            ("no token", "", MISSING),
            ("empty token", "token=", MISSING),
            ("bare token key", "token", MISSING),
            ("other params only", "foo=bar", MISSING),
            ("no sub", tq(token(None)), NO_SUB),
            ("empty sub", tq(token("")), NO_SUB),
            ("bad signature", tq(token(key=SECRET + "x")), INVALID),
            ("tampered payload", tq(_tamper(token("user-1"))), INVALID),
            ("expired", tq(token(exp=now - 60)), INVALID),
            ("not yet valid (nbf)", tq(token(nbf=now + 600)), INVALID),
            ("issued in the future", tq(token(iat=now + 600)), INVALID),
            ("wrong audience", tq(token(aud="other")), INVALID),
            ("missing audience", tq(token(aud=None)), INVALID),
            ("malformed", tq("not-a-jwt"), INVALID),
            ("malformed three parts", tq("a.b.c"), INVALID),
            ("alg none", tq(forge({"alg": "none", "typ": "JWT"}, claims(), None)), INVALID),
            ("alg None with a signature", tq(forge({"alg": "None", "typ": "JWT"}, claims(), SECRET.encode())), INVALID),
            ("other HS algorithm", tq(token(key=SECRET * 2, algorithm="HS512")), INVALID),
            ("RS256 token", tq(rsa_pair.token()), INVALID),
            ("ES256 token", tq(ec_pair.token()), INVALID),
            ("EdDSA token", tq(keypair("ed").token()), INVALID),
            ("sub not a string", tq(token(12345)), INVALID),
        ])

    @inlineCallbacks
    def test_last_token_counts(self) -> Any:
        server = self.server()
        good, bad = token("user-1"), token("user-1", key="wrong" * 10)
        yield self.assertMatrix(server.port, [
            ("bad then good", f"token={bad}&token={good}", "user-1"),
            ("good then bad", f"token={good}&token={bad}", INVALID),
            ("two users", f"token={token('first')}&token={token('second')}", "second"),
            ("around other params", f"a=1&token={bad}&b=2&token={good}&c=3", "user-1"),
        ])

    @inlineCallbacks
    def test_last_token_empty_is_missing(self) -> Any:
        """`token=<valid>&token=`: the last one counts and an empty value is
        missing, so 4001 (as the AutoGPT server, whose query parsing keeps
        blank values; Autobahn's request.params drops them)."""
        server = self.server()
        yield self.assertClosed(server.port, f"token={token('user-1')}&token=", MISSING)

    @inlineCallbacks
    def test_close_is_the_only_frame_on_the_wire(self) -> Any:
        """Byte for byte after the 101: exactly one close frame."""
        server = self.server()
        for query, (code, reason) in (("", MISSING), (tq(token(None)), NO_SUB), (tq("garbage"), INVALID)):
            data = yield raw_request(server.port, upgrade_request("/ws?" + query), until=_first_frame_complete)
            head, _, rest = data.partition(b"\r\n\r\n")
            self.assertTrue(head.startswith(b"HTTP/1.1 101 "), head)
            self.assertEqual(rest, close_frame(code, reason), query)

    @inlineCallbacks
    def test_http_failure_mode(self) -> Any:
        """auth_failure=http: plain HTTP 403, no upgrade, for every reason;
        a good token still upgrades."""
        server = self.server(auth_failure="http")
        for query in ("", "token=", tq(token(None)), tq(token(key="x" * 40)), tq("garbage")):
            data = yield raw_request(server.port, upgrade_request("/ws?" + query))
            self.assertTrue(data.startswith(b"HTTP/1.1 403 "), (query, data[:80]))
            self.assertNotIn(b"101", data.split(b"\r\n", 1)[0])
            self.assertNotIn(b"\x88", data)
        yield self.assertUser(server.port, tq(token("user-9")), "user-9")

    @inlineCallbacks
    def test_http_403_is_the_default(self) -> Any:
        """As the AutoGPT server puts it on the wire (uvicorn answers a close
        before accept with 403); AUTH_FAILURE=close is the other choice."""
        settings = load(None, env={"ENABLE_AUTH": "true", "JWT_VERIFY_KEY": SECRET},
                        overrides={"host": "127.0.0.1", "port": 0})
        self.assertEqual(settings.auth_failure, "http")
        server = start_server(self, settings)
        for query in ("", tq(token(key="x" * 40))):
            data = yield raw_request(server.port, upgrade_request("/ws?" + query))
            self.assertTrue(data.startswith(b"HTTP/1.1 403 "), data[:80])
        closing = load(None, env={"ENABLE_AUTH": "true", "JWT_VERIFY_KEY": SECRET, "AUTH_FAILURE": "close"})
        self.assertEqual(closing.auth_failure, "close")

    @inlineCallbacks
    def test_supabase_secret_fallback(self) -> Any:
        base = {"ENABLE_AUTH": "true"}
        other = "another-secret-long-enough-for-hs256-abcdefghijkl"
        settings = load(None, env={**base, "SUPABASE_JWT_SECRET": SECRET},
                        overrides={"host": "127.0.0.1", "port": 0, "auth_failure": "close"})
        self.assertEqual(settings.jwt_verify_key, SECRET)
        both = load(None, env={**base, "JWT_VERIFY_KEY": other, "SUPABASE_JWT_SECRET": SECRET})
        self.assertEqual(both.jwt_verify_key, other)
        empty_first = load(None, env={**base, "JWT_VERIFY_KEY": "", "SUPABASE_JWT_SECRET": SECRET})
        self.assertEqual(empty_first.jwt_verify_key, SECRET)
        server = start_server(self, settings)
        yield self.assertMatrix(server.port, [
            ("signed with the fallback secret", tq(token("user-s")), "user-s"),
            ("signed with another secret", tq(token("user-s", key=other)), INVALID),
        ])


def _tamper(value: str) -> str:
    head, body, sig = value.split(".")
    payload = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
    payload["sub"] = "admin"
    return ".".join((head, _b64(json.dumps(payload).encode()), sig))


class PublicKeyMode(AuthCase):
    """JWT_SIGN_ALGORITHM asymmetric, JWT_VERIFY_KEY a PEM public key."""

    @inlineCallbacks
    def test_rs256_pem(self) -> Any:
        pair = keypair("rsa")
        pem = pair.public_pem()
        settings = load(None, env={"ENABLE_AUTH": "true", "JWT_SIGN_ALGORITHM": "RS256", "JWT_VERIFY_KEY": pem},
                        overrides={"host": "127.0.0.1", "port": 0, "auth_failure": "close"})
        server = start_server(self, settings)
        confusion = forge({"alg": "HS256", "typ": "JWT"}, claims("attacker"), pem.encode())
        confusion_stripped = forge({"alg": "HS256", "typ": "JWT"}, claims("attacker"), pem.strip().encode())
        yield self.assertMatrix(server.port, [
            ("valid", tq(pair.token(sub="user-r")), "user-r"),
            ("valid without kid", tq(pair.token(kid=None, sub="user-r2")), "user-r2"),
            ("another RSA key", tq(keypair("rsa-other").token()), INVALID),
            ("algorithm confusion", tq(confusion), INVALID),
            ("algorithm confusion (stripped PEM)", tq(confusion_stripped), INVALID),
            ("HS256 with the shared test secret", tq(token()), INVALID),
            ("ES256 token", tq(keypair("ec").token()), INVALID),
            ("alg none", tq(forge({"alg": "none"}, claims(), None)), INVALID),
            ("expired", tq(pair.token(exp=int(time.time()) - 5)), INVALID),
            ("wrong audience", tq(pair.token(aud="anon")), INVALID),
            ("no sub", tq(pair.token(sub=None)), NO_SUB),
            ("no token", "", MISSING),
        ])

    @inlineCallbacks
    def test_es256_pem(self) -> Any:
        pair = keypair("ec")
        server = start_server(self, enable_auth=True, auth_failure="close", jwt_sign_algorithm="ES256", jwt_verify_key=pair.public_pem())
        yield self.assertMatrix(server.port, [
            ("valid", tq(pair.token(sub="user-e")), "user-e"),
            ("another EC key", tq(keypair("ec-other").token()), INVALID),
            ("RS256 token", tq(keypair("rsa").token()), INVALID),
            ("algorithm confusion", tq(forge({"alg": "HS256"}, claims(), pair.public_pem().encode())), INVALID),
        ])


class KeySetMode(AuthCase):
    """JWT_JWKS_URL: ES256, RS256 and EdDSA keys picked by kid."""

    def key_set_file(self, body: bytes) -> str:
        path = self.mktemp()
        with open(path, "wb") as handle:
            handle.write(body)
        return "file://" + path

    def matrix(self) -> list[tuple[str, str, tuple[int, str] | str]]:
        rsa_pair, ec_pair, ed_pair = keypair("rsa"), keypair("ec"), keypair("ed")
        rsa_pem = rsa_pair.public_pem().encode()
        return [
            ("ES256", tq(ec_pair.token(sub="user-ec")), "user-ec"),
            ("RS256", tq(rsa_pair.token(sub="user-rsa")), "user-rsa"),
            ("EdDSA", tq(ed_pair.token(sub="user-ed")), "user-ed"),
            ("no token", "", MISSING),
            ("empty token", "token=", MISSING),
            ("no sub", tq(ec_pair.token(sub=None)), NO_SUB),
            ("empty sub", tq(rsa_pair.token(sub="")), NO_SUB),
            ("unknown kid", tq(ec_pair.token(kid="nobody")), INVALID),
            ("no kid, several keys", tq(ec_pair.token(kid=None)), INVALID),
            ("signed by another key under a known kid", tq(keypair("ec-other").token(kid="ec")), INVALID),
            ("kid of a key of another type", tq(ec_pair.token(kid="rsa")), INVALID),
            ("expired", tq(ed_pair.token(exp=int(time.time()) - 5)), INVALID),
            ("wrong audience", tq(ec_pair.token(aud="nope")), INVALID),
            ("missing audience", tq(rsa_pair.token(aud=None)), INVALID),
            ("malformed", tq("eyJhbGciOiJFUzI1NiJ9.garbage"), INVALID),
            ("alg none", tq(forge({"alg": "none", "kid": "ec"}, claims(), None)), INVALID),
            ("HS256 token", tq(token(headers={"kid": "ec"})), INVALID),
            ("HS256 keyed with the RSA public key", tq(forge({"alg": "HS256", "kid": "rsa"}, claims(), rsa_pem)), INVALID),
            ("algorithm not configured (RS512)", tq(rsa_pair.token(alg="RS512")), INVALID),
        ]

    @inlineCallbacks
    def test_matrix_from_a_file_url(self) -> Any:
        url = self.key_set_file(jwks(keypair("ec"), keypair("rsa"), keypair("ed")))
        server = start_server(self, enable_auth=True, auth_failure="close", jwt_jwks_url=url)
        self.assertEqual(server.verifier.mode, "jwks")
        yield self.assertMatrix(server.port, self.matrix())

    @inlineCallbacks
    def test_matrix_over_http(self) -> Any:
        page, url = serve_key_set(self, jwks(keypair("ec"), keypair("rsa"), keypair("ed")))
        server = start_server(self, enable_auth=True, auth_failure="close", jwt_jwks_url=url)
        yield self.assertMatrix(server.port, self.matrix())
        # one fetch at startup; unknown kids within the minute fetch nothing more
        self.assertEqual(page.requests, 1)

    @inlineCallbacks
    def test_keys_without_alg_member(self) -> Any:
        """A JWKS whose keys do not name their algorithm: the key type still
        decides (an ES256 token under an RSA kid fails)."""
        url = self.key_set_file(jwks(keypair("ec"), keypair("rsa"), keypair("ed"), with_alg=False))
        server = start_server(self, enable_auth=True, auth_failure="close", jwt_jwks_url=url)
        ec_pair, rsa_pair, ed_pair = keypair("ec"), keypair("rsa"), keypair("ed")
        yield self.assertMatrix(server.port, [
            ("ES256", tq(ec_pair.token(sub="a")), "a"),
            ("RS256", tq(rsa_pair.token(sub="b")), "b"),
            ("EdDSA", tq(ed_pair.token(sub="c")), "c"),
            ("ES256 under the RSA kid", tq(ec_pair.token(kid="rsa")), INVALID),
            ("RS256 under the EC kid", tq(rsa_pair.token(kid="ec")), INVALID),
            ("EdDSA under the EC kid", tq(ed_pair.token(kid="ec")), INVALID),
            ("EdDSA under the RSA kid", tq(ed_pair.token(kid="rsa")), INVALID),
            ("ES256 under the EdDSA kid", tq(ec_pair.token(kid="ed")), INVALID),
            ("RS256 under the EdDSA kid", tq(rsa_pair.token(kid="ed")), INVALID),
        ])

    @inlineCallbacks
    def test_single_key_without_kid(self) -> Any:
        url = self.key_set_file(jwks(keypair("ed")))
        server = start_server(self, enable_auth=True, auth_failure="close", jwt_jwks_url=url)
        yield self.assertUser(server.port, tq(keypair("ed").token(kid=None, sub="solo")), "solo")

    @inlineCallbacks
    def test_http_failure_mode(self) -> Any:
        url = self.key_set_file(jwks(keypair("ec")))
        server = start_server(self, enable_auth=True, jwt_jwks_url=url, auth_failure="http")
        for query in ("", tq(keypair("ec").token(sub=None)), tq(keypair("ec").token(kid="nobody"))):
            data = yield raw_request(server.port, upgrade_request("/ws?" + query))
            self.assertTrue(data.startswith(b"HTTP/1.1 403 "), (query, data[:80]))

    @inlineCallbacks
    def test_cached_and_refetched_once_per_interval(self) -> Any:
        """Real HTTP key set, a task.Clock in the verifier: known kids never
        fetch; an unknown kid fetches again only once the interval passed."""
        ec_pair, rsa_pair = keypair("ec"), keypair("rsa")
        page, url = serve_key_set(self, jwks(ec_pair))
        clock = task.Clock()
        settings = make_settings(enable_auth=True, jwt_jwks_url=url, auth_failure="close")
        verifier = KeySetVerifier(url, list(settings.jwt_jwks_algorithms), "authenticated", 0.0, 2.0, 60.0,
                                  clock, http_fetcher(reactor))
        server = WebsocketServer(settings, reactor=reactor, verifier=verifier)
        server.privilegedStartService()
        server.startService()
        self.addCleanup(server.stopService)
        # the startup fetch is under way: a token arriving now waits for it
        yield self.assertUser(server.port, tq(ec_pair.token(sub="early")), "early")
        self.assertEqual(page.requests, 1)
        for _ in range(3):
            yield self.assertUser(server.port, tq(ec_pair.token(sub="cached")), "cached")
        self.assertEqual(page.requests, 1)
        # a new key is published; within the interval its kid stays unknown
        page.body = jwks(ec_pair, rsa_pair)
        clock.advance(30)
        yield self.assertClosed(server.port, tq(rsa_pair.token()), INVALID)
        yield self.assertClosed(server.port, tq(rsa_pair.token()), INVALID)
        self.assertEqual(page.requests, 1)
        clock.advance(29.9)
        yield self.assertClosed(server.port, tq(rsa_pair.token()), INVALID)
        self.assertEqual(page.requests, 1)
        clock.advance(0.1)  # 60 s after the last fetch
        yield self.assertUser(server.port, tq(rsa_pair.token(sub="new-key")), "new-key")
        self.assertEqual(page.requests, 2)
        yield self.assertUser(server.port, tq(rsa_pair.token(sub="new-key")), "new-key")
        yield self.assertClosed(server.port, tq(rsa_pair.token(kid="still-unknown")), INVALID)
        self.assertEqual(page.requests, 2)
        clock.advance(60)
        yield self.assertClosed(server.port, tq(rsa_pair.token(kid="still-unknown")), INVALID)
        self.assertEqual(page.requests, 3)

    @inlineCallbacks
    def test_fetch_timeout_is_4003_not_a_hang(self) -> Any:
        connections, url = serve_silence(self)
        failures: list[str] = []

        def observe(event: dict[str, Any]) -> None:
            if event.get("log_namespace") == "autogpt_ws.sockets.auth" and "fetch" in event.get("log_format", ""):
                failures.append(formatEvent(event))

        globalLogPublisher.addObserver(observe)
        self.addCleanup(globalLogPublisher.removeObserver, observe)
        server = start_server(self, enable_auth=True, auth_failure="close", jwt_jwks_url=url, jwt_jwks_timeout=0.3)
        # the token waits for the startup fetch; that one times out, then 4003
        yield self.assertClosed(server.port, tq(keypair("ec").token()), INVALID)
        self.assertEqual(len(connections), 1)
        self.assertEqual(len(failures), 1, failures)
        self.assertIn("failed", failures[0])

    @inlineCallbacks
    def test_http_fetcher_times_out(self) -> Any:
        connections, url = serve_silence(self)
        fetch = http_fetcher(reactor)
        d = fetch(url, 0.2)
        yield self.assertFailure(d, Exception)
        self.assertEqual(len(connections), 1)

    @inlineCallbacks
    def test_http_fetcher_refuses_a_non_200(self) -> Any:
        root = Resource()  # every path is a 404
        site = Site(root)
        site.noisy = False
        port = reactor.listenTCP(0, site, interface="127.0.0.1")  # type: ignore[attr-defined]
        self.addCleanup(port.stopListening)
        d = http_fetcher(reactor)(f"http://127.0.0.1:{port.getHost().port}/jwks.json", 2.0)
        failure = yield self.assertFailure(d, ValueError)
        self.assertIn("404", str(failure))


class KeySetVerifierUnit(TestCase):
    """KeySetVerifier with an injected clock and fetcher: counted fetches."""

    def setUp(self) -> None:
        self.clock = task.Clock()
        self.fetches: list[Deferred[bytes]] = []
        self.body = jwks(keypair("ec"))
        self.pending = False

    def fetch(self, url: str, timeout: float) -> Deferred[bytes]:
        d: Deferred[bytes] = Deferred() if self.pending else succeed(self.body)
        self.fetches.append(d)
        return d

    def verifier(self, interval: float = 60.0) -> KeySetVerifier:
        return KeySetVerifier("https://example.invalid/jwks", ["ES256", "RS256", "EdDSA"], "authenticated",
                              0.0, 5.0, interval, self.clock, self.fetch)

    def outcome(self, d: Deferred[Identity]) -> Any:
        results: list[Any] = []
        d.addBoth(results.append)
        self.assertEqual(len(results), 1, "verify did not complete")
        result = results[0]
        if isinstance(result, Identity):
            return result.user_id
        result.trap(AuthFailure)
        return (result.value.code, result.value.reason)

    def test_refetch_at_most_once_per_interval(self) -> None:
        v = self.verifier()
        v.start()
        self.assertEqual(len(self.fetches), 1)
        ec_pair, rsa_pair = keypair("ec"), keypair("rsa")
        self.assertEqual(self.outcome(v.verify(ec_pair.token(sub="a"))), "a")
        self.body = jwks(ec_pair, rsa_pair)
        for step in (0, 10, 49.99):
            self.clock.advance(step)
            self.assertEqual(self.outcome(v.verify(rsa_pair.token())), INVALID)
        self.assertEqual(len(self.fetches), 1)
        self.clock.advance(0.01)
        self.assertEqual(self.outcome(v.verify(rsa_pair.token(sub="b"))), "b")
        self.assertEqual(len(self.fetches), 2)
        self.assertEqual(self.outcome(v.verify(rsa_pair.token(kid="x"))), INVALID)
        self.assertEqual(len(self.fetches), 2)

    def test_concurrent_unknown_kids_share_one_fetch(self) -> None:
        self.pending = True
        v = self.verifier()
        v.start()
        ec_pair = keypair("ec")
        first, second = v.verify(ec_pair.token(sub="a")), v.verify(ec_pair.token(sub="b"))
        self.assertEqual(len(self.fetches), 1)
        self.assertFalse(first.called or second.called)
        self.fetches[0].callback(self.body)
        self.assertEqual((self.outcome(first), self.outcome(second)), ("a", "b"))

    def test_failed_fetch_keeps_the_cached_keys(self) -> None:
        v = self.verifier(interval=0)
        v.start()
        ec_pair = keypair("ec")
        self.assertEqual(self.outcome(v.verify(ec_pair.token(sub="a"))), "a")
        self.pending = True
        d = v.verify(ec_pair.token(kid="unknown"))
        self.fetches[-1].errback(ConnectionError("down"))
        self.assertEqual(self.outcome(d), INVALID)
        self.assertEqual(self.outcome(v.verify(ec_pair.token(sub="still"))), "still")
        self.pending = False
        self.body = b'{"keys": "not a list"}'
        self.assertEqual(self.outcome(v.verify(ec_pair.token(kid="unknown-2"))), INVALID)
        self.assertEqual(self.outcome(v.verify(ec_pair.token(sub="again"))), "again")

    def test_algorithm_refused_before_any_fetch(self) -> None:
        v = self.verifier(interval=0)
        v.start()
        for bad in (token(headers={"kid": "zz"}), forge({"alg": "none", "kid": "zz"}, claims(), None), "x.y"):
            self.assertEqual(self.outcome(v.verify(bad)), INVALID)
        self.assertEqual(len(self.fetches), 1)
        self.assertEqual(self.outcome(v.verify(None)), MISSING)
        self.assertEqual(self.outcome(v.verify("")), MISSING)


class TokenNeverLogged(AuthCase):
    """Debug level, every log event of a failing and a succeeding handshake:
    the token appears nowhere, neither in what the server's log observer
    writes nor in the events our own code emits."""

    def capture(self) -> tuple[list[dict[str, Any]], StringIO]:
        events: list[dict[str, Any]] = []
        stream = StringIO()
        written = logs.make_observer("debug", "text", stream)
        as_json = logs.make_observer("debug", "json", stream)
        level = txaio.get_global_log_level()
        txaio.set_global_log_level("debug")  # Autobahn's own debug events too

        def observe(event: dict[str, Any]) -> None:
            events.append(event)
            written(event)
            as_json(event)

        globalLogPublisher.addObserver(observe)

        def restore() -> None:
            globalLogPublisher.removeObserver(observe)
            txaio.set_global_log_level(level)

        self.addCleanup(restore)
        return events, stream

    def assertNowhere(self, secret: str, events: list[dict[str, Any]], stream: StringIO) -> None:
        """Not in any line the server's observers wrote (text and JSON), nor
        in any event but Autobahn's: at debug level Autobahn logs the raw
        upgrade request, and the observers' redaction is what keeps it out."""
        self.assertNotIn(secret, stream.getvalue())
        for event in events:
            if str(event.get("log_namespace", "")).startswith("autobahn."):
                continue
            text = formatEvent(event) + repr(event)
            failure = event.get("log_failure")
            if failure is not None:
                text += failure.getTraceback()
            self.assertNotIn(secret, text, event.get("log_namespace"))

    @inlineCallbacks
    def check(self, server: WebsocketServer, good: str, bad: str) -> Any:
        events, stream = self.capture()
        yield self.assertUser(server.port, tq(good), "user-log")
        yield self.assertClosed(server.port, tq(bad), INVALID)
        yield raw_request(server.port, upgrade_request("/ws?" + tq(bad)), until=_first_frame_complete)
        self.assertTrue(any(str(e.get("log_namespace", "")).startswith("autogpt_ws") for e in events))
        # not vacuous: debug events were seen, and redaction had work to do
        self.assertTrue(any(e.get("log_level") == LogLevel.debug for e in events))
        self.assertIn("token=***", stream.getvalue())
        secret_parts = [bad, good, bad.split(".")[2], good.split(".")[2]]
        for secret in secret_parts:
            self.assertNowhere(secret, events, stream)

    @inlineCallbacks
    def test_shared_secret(self) -> Any:
        server = start_server(self, enable_auth=True, auth_failure="close", jwt_verify_key=SECRET)
        yield self.check(server, token("user-log"), token("user-log", key="wrong" * 10))

    @inlineCallbacks
    def test_http_failure_mode(self) -> Any:
        server = start_server(self, enable_auth=True, jwt_verify_key=SECRET, auth_failure="http")
        events, stream = self.capture()
        bad = token("user-log", exp=int(time.time()) - 100)
        data = yield raw_request(server.port, upgrade_request("/ws?" + tq(bad)))
        self.assertTrue(data.startswith(b"HTTP/1.1 403"))
        self.assertNotIn(bad.encode(), data)
        self.assertNowhere(bad, events, stream)


class RedactionGuard(TestCase):
    """The last line of defence: whatever a library logs, the server's log
    observers write ``token=***``."""

    def test_observer_redacts_query_tokens(self) -> None:
        secret = token("user-r")
        for fmt in ("text", "json"):
            stream = StringIO()
            observer = logs.make_observer("debug", fmt, stream)
            observer({"log_format": "received HTTP request: GET {uri} HTTP/1.1",
                      "uri": f"/ws?a=1&token={secret}&b=2", "log_level": LogLevel.debug,
                      "log_namespace": "autobahn.test", "log_time": time.time()})
            written = stream.getvalue()
            self.assertIn("token=***", written)
            self.assertNotIn(secret, written)
