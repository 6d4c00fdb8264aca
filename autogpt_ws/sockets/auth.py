"""Token -> user id at the handshake (PROTOCOL.md section 2).

Three verifiers share one interface: auth disabled (everyone is the default
user), a shared secret or PEM key (``JWT_VERIFY_KEY``, ``JWT_SIGN_ALGORITHM``)
and a JSON Web Key Set fetched from ``JWT_JWKS_URL``.  Failures are
:class:`AuthFailure` with the fixed close code and reason.  Tokens are never
logged: failures are logged by reason only.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Callable, Protocol

import jwt
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from ..config import DEFAULT_USER_ID, Settings

log = Logger()


class AuthFailure(Exception):
    def __init__(self, code: int, reason: str, detail: str = "") -> None:
        super().__init__(code, reason)
        self.code = code
        self.reason = reason
        self.detail = detail  # for logs and metrics; never holds the token

    def __repr__(self) -> str:
        return f"AuthFailure({self.code}, {self.reason!r}, {self.detail!r})"


def missing() -> AuthFailure:
    return AuthFailure(4001, "Missing authentication token", "missing")


def no_subject() -> AuthFailure:
    return AuthFailure(4002, "Invalid token", "no_subject")


def invalid(detail: str) -> AuthFailure:
    return AuthFailure(4003, "Invalid token", detail)


@dataclass(frozen=True)
class Identity:
    user_id: str
    expires_at: float | None = None  # the token's exp, seconds since the epoch


class TokenVerifier(Protocol):
    """``verify`` may wait (a key set to fetch).  Verifiers that never wait
    also offer ``verify_now(token) -> Identity`` (raising AuthFailure), which
    the handshake uses to skip a Deferred per connection."""

    mode: str

    def verify(self, token: str | None) -> Deferred[Identity]: ...

    def start(self) -> None: ...


def _failure_kind(exc: Exception) -> str:
    if isinstance(exc, jwt.ExpiredSignatureError):
        return "expired"
    if isinstance(exc, (jwt.InvalidAudienceError, jwt.MissingRequiredClaimError)):
        return "audience"
    if isinstance(exc, jwt.InvalidAlgorithmError):
        return "algorithm"
    if isinstance(exc, jwt.InvalidSignatureError):
        return "signature"
    if isinstance(exc, (jwt.ImmatureSignatureError, jwt.InvalidIssuedAtError)):
        return "not_yet_valid"
    return "malformed"


def identity_from_claims(claims: dict[str, Any]) -> Identity:
    subject = claims.get("sub")
    if not isinstance(subject, str) or not subject:
        raise no_subject()
    exp = claims.get("exp")
    return Identity(subject, float(exp) if isinstance(exp, (int, float)) and not isinstance(exp, bool) else None)


def decode(token: str, key: Any, algorithms: list[str], audience: str, leeway: float) -> Identity:
    """Verify signature, algorithm, audience and exp/nbf/iat; AuthFailure otherwise."""
    try:
        claims = jwt.decode(token, key, algorithms=algorithms, audience=audience, leeway=leeway,
                            options={"verify_signature": True})
    except jwt.PyJWTError as exc:
        raise invalid(_failure_kind(exc)) from None
    except (ValueError, TypeError, KeyError):  # key/algorithm mismatches inside the crypto layer
        raise invalid("malformed") from None
    return identity_from_claims(claims)


class DisabledVerifier:
    """ENABLE_AUTH=false: any token (or none) is the default user."""

    mode = "disabled"

    def verify(self, token: str | None) -> Deferred[Identity]:
        return succeed(self.verify_now(token))

    def verify_now(self, token: str | None) -> Identity:
        return Identity(DEFAULT_USER_ID)

    def start(self) -> None:
        pass


class SecretVerifier:
    """JWT_VERIFY_KEY with JWT_SIGN_ALGORITHM (HS256 by default)."""

    mode = "secret"

    def __init__(self, key: str, algorithm: str, audience: str, leeway: float) -> None:
        self._key = key
        self._algorithms = [algorithm]
        self._audience = audience
        self._leeway = leeway

    def verify(self, token: str | None) -> Deferred[Identity]:
        try:
            return succeed(self.verify_now(token))
        except AuthFailure as exc:
            return fail(exc)

    def verify_now(self, token: str | None) -> Identity:
        """Without waiting (no key to fetch); AuthFailure on failure."""
        if not token:
            raise missing()
        return decode(token, self._key, self._algorithms, self._audience, self._leeway)

    def start(self) -> None:
        pass


Fetcher = Callable[[str, float], "Deferred[bytes]"]


def cleartext_remote_host(url: str) -> str | None:
    """The host of a plain ``http://`` key-set URL that is not local, else
    None.  Local, as the AutoGPT server counts it: localhost, 127.0.0.1,
    ::1, or a single-label name (a container or service on a private
    network, e.g. ``http://frontend:3000``)."""
    if not url.startswith("http://"):
        return None
    from urllib.parse import urlsplit

    try:
        host = urlsplit(url).hostname or ""
    except ValueError:
        return None  # a malformed URL fails loudly when fetched
    if host in ("localhost", "127.0.0.1", "::1") or ("." not in host and ":" not in host):
        return None
    return host


class KeySetVerifier:
    """JWT_JWKS_URL: keys picked by ``kid``, cached; an unknown kid refetches
    the set at most once per ``refetch_interval``; fetches time out."""

    mode = "jwks"

    def __init__(self, url: str, algorithms: list[str], audience: str, leeway: float,
                 timeout: float, refetch_interval: float, clock: IReactorTime, fetch: Fetcher,
                 allow_cleartext: bool = False) -> None:
        self._url = url
        self._cleartext_host = None if allow_cleartext else cleartext_remote_host(url)
        self._algorithms = algorithms
        self._audience = audience
        self._leeway = leeway
        self._timeout = timeout
        self._refetch_interval = refetch_interval
        self._clock = clock
        self._fetch = fetch
        self._keys: dict[str | None, tuple[jwt.PyJWK, str | None]] = {}
        self._fetched_at: float | None = None
        self._pending: Deferred[None] | None = None
        self._waiters: list[Deferred[None]] = []

    def start(self) -> None:
        if self._cleartext_host is not None:
            log.warn("JWT_JWKS_URL fetches keys over cleartext http:// from a host that is not local ({host}): "
                     "anyone in the network path could substitute them and forge tokens for any user. Use "
                     "https://, or set JWKS_ALLOW_INSECURE_TRANSPORT=true to silence this if the path is trusted.",
                     host=self._cleartext_host)
        self._refresh()

    def _refresh(self) -> Deferred[None]:
        """Fetch the key set once; concurrent callers share the fetch."""
        waiter: Deferred[None] = Deferred()
        self._waiters.append(waiter)
        if self._pending is None:
            self._fetched_at = self._clock.seconds()
            self._pending = self._fetch(self._url, self._timeout)
            self._pending.addCallbacks(self._loaded, self._failed)
            self._pending.addBoth(self._release)
        return waiter

    def _loaded(self, body: bytes) -> None:
        try:
            entries = json.loads(body)["keys"]
            if not isinstance(entries, list):
                raise TypeError("keys is not a list")
        except (ValueError, TypeError, KeyError) as exc:
            log.warn("key set from {url} is unusable: {error}", url=self._url, error=str(exc))
            return
        keys: dict[str | None, tuple[jwt.PyJWK, str | None]] = {}
        for entry in entries:
            try:
                key = jwt.PyJWK.from_dict(entry)
            except (jwt.PyJWTError, ValueError, TypeError, AttributeError):
                continue  # a key type or curve we cannot use: skip it, keep the rest
            if entry.get("use", "sig") == "sig":
                keys[key.key_id] = (key, entry.get("alg"))
        self._keys = keys
        log.info("key set loaded from {url}: {count} keys", url=self._url, count=len(keys))

    def _failed(self, failure: Failure) -> None:
        log.warn("key set fetch from {url} failed: {error}", url=self._url, error=failure.getErrorMessage())

    def _release(self, _: object) -> None:
        self._pending = None
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            waiter.callback(None)

    def _may_refetch(self) -> bool:
        return self._fetched_at is None or self._clock.seconds() - self._fetched_at >= self._refetch_interval

    def verify(self, token: str | None) -> Deferred[Identity]:
        if not token:
            return fail(missing())
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            return fail(invalid("malformed"))
        alg = header.get("alg")
        if alg not in self._algorithms:
            return fail(invalid("algorithm"))
        kid = header.get("kid")
        # an unknown kid waits for a fetch under way (the one at startup,
        # say) rather than failing before the keys it may bring are known
        if self._pick(kid) is None and (self._pending is not None or self._may_refetch()):
            return self._refresh().addCallback(lambda _: self._check(token, kid, alg))
        try:
            return succeed(self._check(token, kid, alg))
        except AuthFailure as exc:
            return fail(exc)

    def _pick(self, kid: Any) -> tuple[jwt.PyJWK, str | None] | None:
        if kid is None and len(self._keys) == 1:
            return next(iter(self._keys.values()))
        return self._keys.get(kid) if isinstance(kid, str) else None

    def _check(self, token: str, kid: Any, alg: str) -> Identity:
        picked = self._pick(kid)
        if picked is None:
            raise invalid("unknown_key")
        key, key_alg = picked
        if key_alg is not None and key_alg != alg:
            raise invalid("algorithm")  # a key published for one algorithm is used for no other
        return decode(token, key.key, [alg], self._audience, self._leeway)


def http_fetcher(reactor: Any) -> Fetcher:
    """Fetch a URL (http, https verified, or file://) with a timeout."""

    def fetch(url: str, timeout: float) -> Deferred[bytes]:
        if url.startswith("file://"):
            try:
                with open(url[7:], "rb") as handle:
                    return succeed(handle.read())
            except OSError as exc:
                return fail(exc)
        from twisted.web.client import Agent, readBody

        agent = Agent(reactor, connectTimeout=timeout)
        d = agent.request(b"GET", url.encode("ascii"))

        def body(response: Any) -> Deferred[bytes]:
            if response.code != 200:
                raise ValueError(f"HTTP {response.code}")
            return readBody(response)

        d.addCallback(body)
        d.addTimeout(timeout, reactor)
        return d

    return fetch


def verifier_for(settings: Settings, reactor: Any, fetch: Fetcher | None = None) -> TokenVerifier:
    mode = settings.auth_mode
    if mode == "disabled":
        return DisabledVerifier()
    if mode == "jwks":
        return KeySetVerifier(
            settings.jwt_jwks_url, list(settings.jwt_jwks_algorithms), settings.jwt_audience,
            settings.jwt_leeway, settings.jwt_jwks_timeout, settings.jwt_jwks_refetch_interval,
            reactor, fetch or http_fetcher(reactor), settings.jwks_allow_insecure_transport,
        )
    return SecretVerifier(settings.jwt_verify_key, settings.jwt_sign_algorithm,
                          settings.jwt_audience, settings.jwt_leeway)
