"""Several replicas of one model behind one caller: least-outstanding dispatch, failover, a circuit breaker per
replica, and one model per fleet.

    fleet = Fleet(["10.0.0.1:8001", "http://10.0.0.2:8000"], open_sender, ["pickscore"], connection)
    await fleet.ready()         # each replica's model identity, asked once; Conflict when they serve different models
    result = await fleet.call(rows, lambda sender, timeout: sender.score(...), deadline)

Addresses: gRPC ``host:port``, HTTP ``http[s]://host:port``, or a DNS name each of whose addresses is a replica:
``dns:///host:port`` (gRPC) or ``dns+http://host:port`` / ``dns+https://host:port`` (HTTP), resolved at the start and
again every ``refresh_s`` (a replica that appears is asked its identity before its first call; one that disappears
takes no new calls).

A call goes to the usable replica with the least outstanding work (rows in flight; ties to the one picked least
recently), at most ``per_replica`` calls in flight on each. A replica that fails (connection refused, UNAVAILABLE,
a deadline, or a call hung far past what calls take here) is taken out and the call goes at once to another; the
replica is tried again after a backoff (0.2 s doubling to 10 s, jittered), by one call at a time until one
succeeds (a circuit breaker: open, then half-open), and is asked its identity again first, since it may have come
back with other weights. A refusal (RESOURCE_EXHAUSTED / 429) keeps that replica out for the server's retry hint
(else jittered exponential backoff) without counting as a failure. A call fails only when no replica can take it
before its deadline, with the last error; an error that is the request's (a bad image, a model not served) is
raised at once.

One model per fleet: ``ready()`` asks every replica which model identity (``name:kind:precision:digest``) serves
each of ``names`` and refuses a fleet whose replicas disagree (Conflict, naming what each address serves), unless
``expect`` names the identity (or just its digest) to use: then only the replicas serving it are used.
"""

from __future__ import annotations

import asyncio
import logging
import random
import socket
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from contextlib import suppress
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from pickscore.errors import Conflict, DeadlineExceeded, Overloaded, PickScoreError, Unavailable

log = logging.getLogger("pickscore.fleet")

BACKOFF_S = (0.2, 10.0)  # a failed replica's first and longest time out
ASK_S = 5.0  # how long a replica has to say which model it serves (else it counts as down, asked again later)
STALL_FACTOR = 8  # a call is hung once it has run this many times longer than the slowest recent success
DNS_SCHEMES = {"dns:///": "", "dns+http://": "http://", "dns+https://": "https://"}  # -> what a replica is dialled as


@dataclass(frozen=True)
class Served:
    """What a replica serves under one of the names asked: the model's source and identity."""

    source: str
    identity: str


def by_name(served: dict[str, Served]) -> dict[str, str]:
    """Identities by the name each model is served under (the name asked, or for "" the default's own name)."""
    return {s.identity.split(":", 1)[0] if s.identity else name: s.identity for name, s in served.items()}


def matches(identity: str, expected: str) -> bool:
    """Whether ``identity`` (name:kind:precision:digest) is the ``expected`` one: the whole identity, or its digest."""
    return bool(identity) and expected in (identity, identity.rsplit(":", 1)[-1])


def retry_wait(error: Overloaded | Unavailable, attempt: int) -> float:
    """Seconds to wait before retrying after ``error``: the server's hint, else jittered exponential backoff from
    50 ms, at most 5 s."""
    hint = getattr(error, "retry_after_s", None)
    return hint if hint else min(5.0, 0.05 * 2**attempt) * (0.5 + random.random())


@dataclass(eq=False)
class Replica:
    address: str  # as dialled: host:port or http[s]://host:port
    sender: Any
    server_name: str | None = None  # the DNS name it was resolved from (a TLS certificate is checked for it)
    inflight: int = 0  # calls
    outstanding: int = 0  # rows in those calls
    failures: int = 0  # consecutive: > 0 while the breaker is open or half-open
    available_at: float = 0.0  # no new call before this loop time (breaker open, or the server's retry hint)
    served: dict[str, Served] | None = None  # by name asked; None until asked (again after a failure)
    excluded: str = ""  # why it is not used (it serves another model); empty when it may be
    removed: bool = False  # gone from DNS: takes no new call
    rows: int = 0  # rows it answered
    last_error: str = ""
    picked: int = 0  # when it was last picked (ties go to the one picked least recently)

    def usable(self, now: float, cap: int) -> bool:
        if self.excluded or self.removed or self.available_at > now or self.inflight >= cap:
            return False
        return not (self.failures and self.inflight)  # half-open: one call at a time until one succeeds


@dataclass
class _Target:
    """One entry of the addresses: a replica's address, or a DNS name whose addresses are replicas."""

    text: str
    host: str = ""  # for a DNS name
    port: int = 0
    scheme: str = ""  # what its replicas are dialled as: "" (gRPC), "http://", "https://"
    addresses: list[str] = field(default_factory=list)


def _target(text: str) -> _Target:
    for prefix, scheme in DNS_SCHEMES.items():
        if text.startswith(prefix):
            rest = urlsplit("//" + text[len(prefix) :].rstrip("/"))
            if not rest.hostname or rest.port is None:
                raise ValueError(f"{text}: a DNS name needs a host and a port, e.g. {prefix}scorer.default.svc:8001")
            return _Target(text, rest.hostname, rest.port, scheme)
    return _Target(text, addresses=[text])


def addresses_of(addresses: Sequence[str]) -> list[str]:
    """Several addresses, checked: ValueError for none, an empty one or a repeat."""
    items = [a.strip() for a in addresses]
    if not items or "" in items:
        raise ValueError(f"no server address in {addresses!r}")
    repeated = sorted({a for a in items if items.count(a) > 1})
    if repeated:
        raise ValueError(f"server address {repeated[0]} given twice")
    return items


class Fleet:
    """The replicas behind one caller (see the module's docstring). Runs on one event loop: create it anywhere,
    use it from that loop. ``open_sender(address, tls_server_name)`` makes a replica's sender (with ``async
    close()``), checking a TLS certificate for that name when it is not None;
    ``names``: the model names the caller's requests use ("" for a server's default); ``connection``: the clients'
    keywords (TLS, token), for asking identities; ``resolve``: host, port -> addresses (default: the system's DNS)."""

    def __init__(
        self,
        addresses: Sequence[str],
        open_sender: Callable[[str, str | None], Any],
        names: Sequence[str],
        connection: dict[str, Any],
        *,
        expect: Sequence[str] = (),
        per_replica: int = 4,
        refresh_s: float = 30.0,
        stall_floor_s: float = 10.0,
        resolve: Callable[[str, int], Awaitable[list[str]]] | None = None,
    ):
        self._targets = [_target(a) for a in addresses_of(addresses)]
        self._open_sender, self.names, self._connection = open_sender, list(names) or [""], connection
        self.expect, self.per_replica, self.refresh_s = list(expect), per_replica, refresh_s
        self.stall_floor_s = stall_floor_s
        self._resolve_name = resolve or _resolve
        self.replicas: list[Replica] = [Replica(a, None) for t in self._targets for a in t.addresses]
        self._served: dict[str, Served] | None = None
        self._ready: asyncio.Lock | None = None
        self._changed: asyncio.Event | None = None
        self._refresher: asyncio.Task | None = None
        self._recent: deque[float] = deque(maxlen=64)  # seconds the recent successful calls took
        self._picks = 0

    # Identity --------------------------------------------------------------------------------------------

    async def ready(self, deadline: float | None = None) -> dict[str, Served]:
        """What the fleet serves under each name, every replica asked once (concurrently). Unavailable naming every
        address when none answers (with ``deadline``: asked again with backoff until it passes); Conflict when the
        replicas that answer serve different models and ``expect`` does not say which, or none serves ``expect``."""
        if self._ready is None:
            self._ready = asyncio.Lock()
        async with self._ready:
            attempt = 0
            while self._served is None:
                try:
                    await self._identify_all()
                except Unavailable as e:
                    wait = retry_wait(e, attempt)
                    attempt += 1
                    if deadline is None or asyncio.get_running_loop().time() + wait >= deadline:
                        raise
                    await asyncio.sleep(wait)
        if self._refresher is None and any(t.host for t in self._targets):
            self._refresher = asyncio.create_task(self._refresh())
        return self._served

    async def _identify_all(self) -> None:
        if any(t.host for t in self._targets):
            await self._resolve_all(first=True)
        live = [r for r in self.replicas if not r.removed]
        answers = await asyncio.gather(*(self._ask(r) for r in live), return_exceptions=True)
        for answer in answers:
            if isinstance(answer, BaseException) and not isinstance(answer, PickScoreError):
                raise answer
        unreachable = [(r, a) for r, a in zip(live, answers) if isinstance(a, Unavailable | DeadlineExceeded)]
        for r, a in unreachable:  # tried again after a backoff, asked first
            self._trip(r, a)
        reached = [r for r in live if r not in dict(unreachable)]
        if not reached:
            raise Unavailable("no server answered: " + "; ".join(f"{r.address}: {a}" for r, a in zip(live, answers)))
        missing = [(r, a) for r, a in zip(reached, answers) if isinstance(a, PickScoreError)]
        if missing and len(missing) == len(reached):  # e.g. none serves the model named
            raise missing[0][1]
        self._served = self._agree([r for r in reached if r.served is not None], [r for r, _ in missing])

    def _agree(self, answered: list[Replica], lacking: list[Replica]) -> dict[str, Served]:
        """The identities the fleet serves, from the replicas that answered; the others are excluded."""

        def what(r: Replica) -> str:
            return ", ".join(f"{s.identity or '(no identity: an older server)'}" for s in r.served.values())

        if self.expect:
            chosen = [r for r in answered if self._expected(r.served)]
            if not chosen:
                raise Conflict(
                    f"no server serves the expected model {','.join(self.expect)}: "
                    + "; ".join([f"{r.address} serves {what(r)}" for r in answered] + [self._lacks(r) for r in lacking])
                )
        else:
            kinds = {_identities(r.served) for r in answered}
            if len(kinds) > 1 or lacking:
                raise Conflict(
                    "the servers serve different models: "
                    + "; ".join([f"{r.address} serves {what(r)}" for r in answered] + [self._lacks(r) for r in lacking])
                    + ". Give --expect-model IDENTITY (expect_model=) to use only the servers serving it"
                )
            chosen = answered
        for r in answered + lacking:
            if r not in chosen:
                self._exclude(r)
        return dict(chosen[0].served)

    def _lacks(self, r: Replica) -> str:
        return f"{r.address}: {r.last_error}"

    def _expected(self, served: dict[str, Served]) -> bool:
        return all(any(matches(s.identity, e) for e in self.expect) for s in served.values())

    def _exclude(self, r: Replica) -> None:
        if r.served is None:  # it answered, but not what it serves under a name (NotFound, Unauthenticated, ...)
            r.excluded = f"left out: {r.last_error}"
        else:
            r.excluded = f"left out: serves {', '.join(s.identity for s in r.served.values())}, not the fleet's model"
        log.warning("server %s %s", r.address, r.excluded)

    async def _ask(self, r: Replica) -> dict[str, Served]:
        """Ask ``r`` what it serves under each name (``r.served``); Unavailable when it does not answer, another
        domain error (NotFound: a name it does not serve) as it is."""
        try:
            checked_as = self._checked_as(r)
            r.served = {name: await describe(r.address, name, self._connection, checked_as) for name in self.names}
        except PickScoreError as e:
            r.served, r.last_error = None, str(e)
            raise
        return r.served

    async def _admit(self, r: Replica) -> bool:
        """A replica asked nothing yet (new from DNS, down at the start, or back after a failure) is asked its
        identity before its first call: False (and left out) when it serves another model or not the names."""
        try:
            served = await self._ask(r)
        except (Unavailable, DeadlineExceeded):
            raise
        except PickScoreError:
            self._exclude(r)
            self._notify()
            return False
        same = self._expected(served) if self.expect else _identities(served) == _identities(self._served)
        if not same:
            self._exclude(r)
            self._notify()
        return same

    # Calls -----------------------------------------------------------------------------------------------

    async def call(self, rows: int, send: Callable[[Any, float], Awaitable[Any]], deadline: float, leased=None):
        """``send(sender, timeout)`` on the best replica, failing over until ``deadline`` (loop time); ``rows``:
        the work it carries (for least-outstanding dispatch). ``leased``: a replica ``lease`` reserved (after
        ``ready``)."""
        if leased is None:
            await self.ready()
        loop = asyncio.get_running_loop()
        attempt, last = 0, None
        while True:
            replica = leased or await self.lease(deadline, last)
            leased = None
            try:
                return await self._attempt(replica, rows, send, deadline)
            except _Failed as e:
                last = e.error
            except Overloaded as e:  # alive but busy: out for the server's hint, not counted as a failure
                wait = retry_wait(e, attempt)
                attempt += 1
                replica.available_at = max(replica.available_at, loop.time() + wait)
                last = e

    async def lease(self, deadline: float, last: PickScoreError | None = None) -> Replica:
        """Reserve a call's place on the best usable replica, waiting for one until ``deadline``: then ``last`` (or
        Unavailable naming every replica) is raised."""
        loop = asyncio.get_running_loop()
        while True:
            now = loop.time()
            usable = [r for r in self.replicas if r.usable(now, self.per_replica)]
            if usable:
                best = min(usable, key=lambda r: (r.outstanding, r.inflight, r.picked))
                self._picks += 1
                best.picked, best.inflight = self._picks, best.inflight + 1
                return best
            live = [r for r in self.replicas if not (r.excluded or r.removed)]
            soonest = min((r.available_at for r in live), default=float("inf"))  # a breaker or a hint ends
            busy = any(r.inflight for r in live)  # a call ending frees its place
            if now >= deadline or (not busy and soonest >= deadline):
                raise last or self._none_left()
            if self._changed is None:
                self._changed = asyncio.Event()
            wake = min(soonest if soonest > now else deadline, deadline)
            with suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._changed.wait(), max(wake - now, 0.001))

    def _none_left(self) -> Unavailable:
        states = [f"{r.address}: {r.excluded or r.last_error or 'busy'}" for r in self.replicas if not r.removed]
        return Unavailable("no server could take the request in time: " + "; ".join(states))

    async def _attempt(self, r: Replica, rows: int, send, deadline: float):
        """One call on ``r`` (already leased): its result; _Failed when the replica failed (taken out)."""
        loop = asyncio.get_running_loop()
        r.outstanding += rows
        task = None
        try:
            if r.served is None and not await self._admit(r):
                raise _Failed(Unavailable(f"{r.address}: {r.excluded}"))
            start = loop.time()
            task = asyncio.ensure_future(send(self.sender(r), max(deadline - start, 0.001)))
            while not task.done():
                limit = self._stall_limit()
                end = deadline if limit is None else min(deadline, start + limit)
                await asyncio.wait({task}, timeout=max(min(end - loop.time(), 1.0), 0.001))
                if not task.done() and loop.time() >= end:
                    what = "past the deadline" if end >= deadline else f"hung for {limit:.1f} s"
                    raise DeadlineExceeded(f"{r.address}: no answer, {what}")
            result = task.result()
        except (Unavailable, DeadlineExceeded) as e:
            self._trip(r, e)
            raise _Failed(e) from None
        finally:
            if task is not None and not task.done():
                task.cancel()
                with suppress(BaseException):
                    await task
            r.inflight -= 1
            r.outstanding -= rows
            self._notify()
        self._recent.append(loop.time() - start)
        r.failures, r.rows = 0, r.rows + rows
        return result

    def _stall_limit(self) -> float | None:
        """How long a call may run before it counts as hung: STALL_FACTOR times the slowest recent success, at least
        ``stall_floor_s``; None before any call succeeded (then only the deadline ends it)."""
        return max(self.stall_floor_s, STALL_FACTOR * max(self._recent)) if self._recent else None

    def _trip(self, r: Replica, error: PickScoreError) -> None:
        """Take ``r`` out after a failure, for a backoff that doubles with each failure in a row (the calls that were
        in flight on it when it failed count once)."""
        now = asyncio.get_running_loop().time()
        r.served = None  # asked again before its next call: it may come back serving other weights
        r.last_error = str(error)
        if r.failures and r.available_at > now:
            return
        r.failures += 1
        wait = min(BACKOFF_S[1], BACKOFF_S[0] * 2 ** (r.failures - 1)) * (0.75 + random.random() / 2)
        r.available_at = now + wait
        log.warning("server %s failed (%s); taken out for %.1f s", r.address, error, wait)

    def _notify(self) -> None:
        if self._changed is not None:
            self._changed.set()
            self._changed = asyncio.Event()

    # DNS -------------------------------------------------------------------------------------------------

    async def _resolve_all(self, first: bool = False) -> None:
        for t in (t for t in self._targets if t.host):
            try:
                found = await self._resolve_name(t.host, t.port)
            except OSError as e:
                if first and not t.addresses:
                    raise Unavailable(f"{t.text}: cannot resolve {t.host}: {e}") from e
                log.warning("%s: cannot resolve %s (%s); keeping its %d servers", t.text, t.host, e, len(t.addresses))
                continue
            wanted = [t.scheme + a for a in found]
            for address in wanted:
                if address not in t.addresses:
                    self.replicas.append(Replica(address, None, server_name=t.host))
            for r in self.replicas:
                if r.address in t.addresses and r.address not in wanted:
                    r.removed = True
                elif r.address in wanted:
                    r.removed = False
            t.addresses = wanted
        self._notify()

    async def _refresh(self) -> None:
        while True:
            await asyncio.sleep(self.refresh_s)
            await self._resolve_all()

    def sender(self, r: Replica) -> Any:
        if r.sender is None:
            r.sender = self._open_sender(r.address, self._checked_as(r))
        return r.sender

    def _checked_as(self, r: Replica) -> str | None:
        """The name a replica's TLS certificate is checked for: the caller's --tls-server-name, else the DNS name
        its address was resolved from, else its address's host (None)."""
        return self._connection.get("tls_server_name") or r.server_name

    async def close(self) -> None:
        if self._refresher is not None:
            self._refresher.cancel()
            with suppress(asyncio.CancelledError):
                await self._refresher
        for r in self.replicas:
            if r.sender is not None:
                await r.sender.close()

    def report(self) -> dict[str, dict[str, Any]]:
        """Each replica's rows answered, failures in a row and state, by address."""
        return {
            r.address: {"rows": r.rows, "failures": r.failures, "excluded": r.excluded, "removed": r.removed}
            for r in self.replicas
        }


def _identities(served: dict[str, Served]) -> tuple[str, ...]:
    """What makes two replicas the same model: the identities (not the sources: one file may sit at two paths)."""
    return tuple(s.identity for s in served.values())


class _Failed(Exception):
    """A replica failed a call (it is taken out; the call goes elsewhere)."""

    def __init__(self, error: PickScoreError):
        self.error = error


async def _resolve(host: str, port: int) -> list[str]:
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    found = []
    for family, *_, sockaddr in infos:
        address = f"[{sockaddr[0]}]:{port}" if family == socket.AF_INET6 else f"{sockaddr[0]}:{port}"
        if address not in found:
            found.append(address)
    return found


async def describe(address: str, name: str, connection: dict[str, Any], tls_server_name: str | None = None) -> Served:
    """What the server at ``address`` serves under ``name`` (empty: its default): source and identity, over gRPC
    (GetModelInfo) or HTTP (GET /v1/model); a TLS certificate is checked for ``tls_server_name`` when given."""
    if not address.startswith(("http://", "https://")):
        from pickscore.client.aio import AsyncClient

        options = {**connection, "tls_server_name": tls_server_name}
        async with AsyncClient(address, timeout=ASK_S, model=name, **options) as client:
            info = await client.model_info()
        return Served(info.source, info.identity)
    import aiohttp

    from pickscore.client.http import get_json
    from pickscore.tls import ssl_context

    ssl = ssl_context(connection.get("tls_ca"), connection.get("tls_cert"), connection.get("tls_key"))
    headers = dict(connection.get("metadata") or ())
    if connection.get("token"):
        headers["authorization"] = f"Bearer {connection['token']}"
    url, query = address.rstrip("/") + "/v1/model", {"model": name} if name else {}
    async with aiohttp.ClientSession() as session:
        info = await get_json(session, url, query, headers, ssl, ASK_S, tls_server_name)
    return Served(info["source"], info.get("identity", ""))
