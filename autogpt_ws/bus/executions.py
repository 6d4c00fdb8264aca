"""Which graph an execution belongs to, from AutoGPT's PostgreSQL database.

The sharded bus names an execution's channel after its graph
(``.../{<user>/<graph>}/exec/<id>``), but a client subscribes with the
execution id alone.  :class:`ExecutionResolver` looks the graph up::

    SELECT "agentGraphId" FROM "<schema>"."AgentGraphExecution"
    WHERE "id" = %s AND "userId" = %s AND "isDeleted" = false

as the AutoGPT server does: scoped to the user, so another user's execution
is "not found", and so is a deleted one.  The schema is the ``?schema=`` of
``DATABASE_URL`` (``platform`` in current deployments).  Answers are
cached per (user, execution) in a bounded LRU with a TTL; "not found" is
cached briefly, because an execution may be created just after a client
asked.  Concurrent lookups of one pair share a single query.  A lookup
that takes longer than ``timeout`` (a database down or hung) fails with
TimeoutError for the one waiting; the query itself is bounded by the
connect and statement timeouts, and its answer is still cached.

Why a thread pool and not psycopg's async API: psycopg's ``AsyncConnection``
runs on asyncio, and this server runs on whatever reactor Twisted picked
(epoll by default), so the async API would need the asyncio reactor for the
whole process.  A lookup is one primary-key query, so blocking psycopg in a
small dedicated pool (``deferToThreadPool``; not the reactor's shared pool,
which DNS uses) costs little, bounds database concurrency to the pool size,
and is started and stopped with the bus.  Connections are reused, one per
busy thread at most, and closed on stop.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

log = Logger()

TABLE = "AgentGraphExecution"
APPLICATION_NAME = "autogpt-ws"  # as pg_stat_activity shows our connections
# Prisma's own URL parameters (AutoGPT's DATABASE_URL uses them); libpq
# refuses unknown ones.  ``schema`` becomes the table's schema.
PRISMA_ONLY = frozenset(("schema", "connection_limit", "pool_timeout", "pgbouncer", "socket_timeout",
                         "statement_cache_size", "sslaccept", "sslidentity"))


class DatabaseNotConfigured(Exception):
    """DATABASE_URL is empty: executions cannot be resolved."""


def conninfo_from_url(url: str) -> tuple[str, str]:
    """(libpq URL without Prisma-only parameters, schema or "")."""
    parts = urlsplit(url)
    params = parse_qsl(parts.query, keep_blank_values=True)
    schema = next((v for k, v in params if k == "schema"), "")
    kept = [(k, v) for k, v in params if k not in PRISMA_ONLY]
    return urlunsplit(parts._replace(query=urlencode(kept))), schema


def describe_url(url: str) -> str:
    """host:port/dbname, for logs (no user, no password)."""
    if not url:
        return "(DATABASE_URL not set)"
    parts = urlsplit(url)
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.hostname or 'localhost'}{port}{parts.path or '/'}"


class ExecutionResolver:
    def __init__(self, database_url: str, reactor: Any, *, clock: Any = None, max_entries: int = 10000,
                 ttl: float = 600.0, negative_ttl: float = 3.0, threads: int = 2,
                 connect_timeout: int = 5, statement_timeout_ms: int = 5000, timeout: float = 5.0) -> None:
        self.database_url = database_url
        self._conninfo, schema = conninfo_from_url(database_url) if database_url else ("", "")
        self._reactor = reactor
        self._clock = clock if clock is not None else reactor
        self.max_entries = max_entries
        self.ttl = ttl
        self.negative_ttl = negative_ttl
        self._threads = threads
        self._connect_timeout = connect_timeout
        self._statement_timeout_ms = statement_timeout_ms
        self.timeout = timeout
        self._query_text = self._build_query(schema)
        # (user, exec id) -> (graph id or None, expires at)
        self._cache: OrderedDict[tuple[str, str], tuple[str | None, float]] = OrderedDict()
        self._inflight: dict[tuple[str, str], list[Deferred[bool]]] = {}
        self._idle: list[Any] = []  # open connections no thread is using
        self._lock = threading.Lock()
        self._pool: ThreadPool | None = None
        self.queries = 0  # database round trips made (for tests and logs)

    @staticmethod
    def _build_query(schema: str) -> Any:
        from psycopg import sql

        table = sql.Identifier(schema, TABLE) if schema else sql.Identifier(TABLE)
        return sql.SQL('SELECT "agentGraphId" FROM {} WHERE "id" = %s AND "userId" = %s AND "isDeleted" = false'
                       ).format(table)

    # -- lifecycle ------------------------------------------------------------

    def start(self) -> None:
        if self._pool is None:
            self._pool = ThreadPool(minthreads=0, maxthreads=self._threads, name="autogpt-ws-db")
            self._pool.start()

    def stop(self) -> None:
        """Join the pool's threads (a running query is bounded by the
        statement timeout) and close every connection."""
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.stop()
        with self._lock:
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()

    # -- lookups --------------------------------------------------------------

    def resolve(self, user_id: str, graph_exec_id: str) -> Deferred[bool]:
        """True when the execution exists and is the user's (its graph id is
        then known to :meth:`graph_id`)."""
        key = (user_id, graph_exec_id)
        entry = self._cache.get(key)
        if entry is not None and entry[1] > self._clock.seconds():
            self._cache.move_to_end(key)
            return succeed(entry[0] is not None)
        if not self._conninfo:
            return fail(DatabaseNotConfigured("DATABASE_URL is not set: cannot resolve executions"))
        if self._pool is None:
            return fail(RuntimeError("execution resolver is not running"))
        waiter: Deferred[bool] = Deferred()
        waiter.addTimeout(self.timeout, self._clock)
        waiting = self._inflight.get(key)
        if waiting is not None:
            waiting.append(waiter)
            return waiter
        self._inflight[key] = [waiter]
        self.queries += 1
        d = deferToThreadPool(self._reactor, self._pool, self._query, user_id, graph_exec_id)
        d.addCallbacks(self._found, self._failed, callbackArgs=(key,), errbackArgs=(key,))
        return waiter

    def graph_id(self, user_id: str, graph_exec_id: str) -> str | None:
        """The graph of an execution :meth:`resolve` found (the mapping never
        changes, so an expired entry still answers); None if not known."""
        entry = self._cache.get((user_id, graph_exec_id))
        return entry[0] if entry is not None else None

    def _found(self, graph_id: str | None, key: tuple[str, str]) -> None:
        ttl = self.ttl if graph_id is not None else self.negative_ttl
        cache = self._cache
        cache[key] = (graph_id, self._clock.seconds() + ttl)
        cache.move_to_end(key)
        while len(cache) > self.max_entries:
            cache.popitem(last=False)
        for waiter in self._inflight.pop(key, ()):
            if not waiter.called:  # else it timed out
                waiter.callback(graph_id is not None)

    def _failed(self, failure: Failure, key: tuple[str, str]) -> None:
        log.warn("execution lookup failed for user {user_id}: {error}", user_id=key[0],
                 error=failure.getErrorMessage())
        for waiter in self._inflight.pop(key, ()):
            if not waiter.called:
                waiter.errback(failure)

    # -- in a pool thread -------------------------------------------------------

    def _query(self, user_id: str, graph_exec_id: str) -> str | None:
        import psycopg

        with self._lock:
            conn = self._idle.pop() if self._idle else None
        if conn is None or conn.closed:
            conn = psycopg.connect(self._conninfo, autocommit=True, connect_timeout=self._connect_timeout,
                                   application_name=APPLICATION_NAME,
                                   options=f"-c statement_timeout={self._statement_timeout_ms}")
            conn.prepare_threshold = None  # no server-side prepared statements: pgbouncer-safe
        try:
            row = conn.execute(self._query_text, (graph_exec_id, user_id)).fetchone()
        except Exception:
            conn.close()  # a broken connection is not reused
            raise
        with self._lock:
            keep = self._pool is not None
            if keep:
                self._idle.append(conn)
        if not keep:
            conn.close()
        return None if row is None else str(row[0])
