"""One task owns the backbone queue: per-tenant lanes, token-budget batches, fair turns, 429s.

Requests never run the model in their handler. A handler asks the in-process tiers itself
(microseconds), then hands the distinct misses to :meth:`Scheduler.run` and awaits them. The
scheduler task packs batches across lanes by deficit round-robin:

    while texts are waiting and the batch has room (rows <= batch_texts, est. tokens <= batch_tokens):
        lane = next lane in turn;  lane.deficit += quantum
        take the lane's oldest texts while each one's estimated tokens <= lane.deficit
        an emptied lane leaves the turn with its deficit reset

so tenant A's 512-text request is served a quantum at a time and tenant B's single text rides
in the next batch, not after A's queue drains. A batch runs in a worker thread (``Engine.fill``:
Redis, then the backbone for what is still missing). While one batch runs, a second may start
for lanes the running batch does not serve: B's text starts at once instead of waiting for A's
batch to end. With ``yield_tokens`` (the CPU default), a batch's forward is cut into pieces of
about that many tokens, and between pieces a batch waits while one of at most half its tokens
runs: B shares the cores only until A's current piece ends, then has them to itself (the smaller
waits for nobody, so two batches never wait for each other). Inside a batch the lanes with the
fewest tokens go first, in pieces of their own, and each piece's answers are delivered when it
ends: B's text packed beside A's rows is answered after the first piece, and B's lane (a small
one, at most ``yield_tokens`` in the batch) is free at once for its next request (bench/load.py, fairness: B's p99 under A's flood went from 1.5-2.5x B alone to
1.66-1.83x in three quiet runs). The Redis write-back of new vectors goes to its own thread so
the reply never waits on it.

Admission: a tenant with more than ``tenant_queue_texts`` texts waiting, or a queue holding
more than ``queue_texts`` in all, gets :class:`OverloadedError` (429 with ``Retry-After``
estimated from recent throughput). A request whose client disconnected is dropped before its
texts reach a batch, and counted.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import math
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Awaitable, Callable

from headfleet.errors import BackendError, ClientGoneError, OverloadedError
from headfleet.engine.types import Answer, Filled

log = logging.getLogger(__name__)


def estimate_tokens(text: str, max_length: int) -> int:
    """Tokens a text will cost in a batch, without tokenising it (about 4 characters a token)."""
    return min(max_length, len(text) // 4 + 2)


@dataclasses.dataclass(eq=False)
class Work:
    """One request's distinct missing texts, with its own future and timestamps."""

    lane: str
    tenant: str
    keys: list[bytes]
    texts: list[str]
    namespaces: list[str]
    costs: list[int]
    future: asyncio.Future
    enqueued: float
    next: int = 0  # first text not yet handed to a batch
    answered: int = 0
    answers: dict[bytes, tuple] = dataclasses.field(default_factory=dict)
    started: float | None = None  # when its first text went into a batch
    gone: bool = False

    @property
    def waiting(self) -> int:
        return len(self.keys) - self.next


@dataclasses.dataclass
class _Lane:
    queue: collections.deque = dataclasses.field(default_factory=collections.deque)
    deficit: int = 0
    waiting: int = 0  # texts not yet in a batch


@dataclasses.dataclass
class SchedulerMetrics:
    """Hooks the service points at its Prometheus metrics; no-ops by default."""

    batch: Callable[[int, int, float], None] = lambda texts, tokens, seconds: None
    queued: Callable[[float], None] = lambda seconds: None
    rejected: Callable[[str], None] = lambda scope: None
    dropped: Callable[[int], None] = lambda texts: None


class Scheduler:
    def __init__(self, fill: Callable[[list[bytes], list[str], list[str]], Filled],
                 write_back: Callable[[Filled], None], *, max_length: int, batch_texts: int, batch_tokens: int,
                 tenant_queue_texts: int, queue_texts: int, metrics: SchedulerMetrics | None = None,
                 workers: int = 2, yield_tokens: int | None = None):
        """``fill(keys, texts, namespaces) -> Filled``: the compute step for one batch of distinct keys
        (the engine's Redis lookup and backbone forward), run in a worker thread; ``write_back(Filled)``:
        the remote-tier write, run on its own thread off the reply path; ``max_length``: the
        backbone's token limit (for cost estimates); ``yield_tokens``: cut a batch's compute into
        ``fill`` calls of about this many estimated tokens and wait between them while a batch of
        at most half as many tokens runs (None: one call per batch, as on a GPU, where big batches
        pay). The queue knows nothing else of its backend."""
        self._fill = fill
        self._write_back_fn = write_back
        self.max_length = int(max_length)
        self.batch_texts = int(batch_texts)
        self.batch_tokens = max(int(batch_tokens), self.max_length)
        # A small quantum (about 1/64 of a batch: a handful of short texts) lets many lanes share one
        # batch; a lane whose next text costs more than its deficit simply waits a few turns.
        self.quantum = max(8, self.batch_tokens // 64)
        self.tenant_queue_texts = int(tenant_queue_texts)
        self.queue_texts = int(queue_texts)
        self.metrics = metrics or SchedulerMetrics()
        self._lanes: dict[str, _Lane] = {}
        self._turn: collections.OrderedDict[str, None] = collections.OrderedDict()  # lanes with texts, in turn order
        self._tenant_waiting: collections.Counter[str] = collections.Counter()
        self._waiting = 0
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.workers = max(1, int(workers))
        self._compute = ThreadPoolExecutor(self.workers, thread_name_prefix="headfleet-backbone")
        self._in_flight: dict[int, set[str]] = {}  # batch id -> lanes it serves
        self.yield_tokens = int(yield_tokens) if yield_tokens else None
        self._running_tokens: dict[int, int] = {}  # batch id -> estimated tokens, while its compute runs
        self._yield = threading.Condition()
        self._batch_ids = 0
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="headfleet-writeback")
        self._rate = 0.0  # texts/s, moving average over batches (for Retry-After)
        self.batches = 0
        self.dropped_requests = 0
        self.dropped_texts = 0
        self.rejected = 0
        self.in_flight = 0
        self.submitted_texts = 0

    # -- lifecycle ----------------------------------------------------------------------------
    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        self._task = asyncio.create_task(self._run(), name="headfleet-scheduler")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
        for lane in self._lanes.values():
            for work in lane.queue:
                if not work.future.done():
                    work.future.set_exception(BackendError("the service is shutting down; retry on another replica"))
        self._lanes.clear()
        self._turn.clear()
        self._compute.shutdown(wait=True)
        self._writer.shutdown(wait=True)  # pending Redis writes are flushed, not lost

    @property
    def waiting(self) -> int:
        return self._waiting

    def waiting_for(self, tenant: str) -> int:
        return self._tenant_waiting[tenant]

    def waiting_by_tenant(self) -> dict[str, int]:
        """Tenant -> texts waiting, tenants with none left out; safe to call from another thread."""
        for _ in range(10):
            try:
                return {t: n for t, n in list(self._tenant_waiting.items()) if n}
            except RuntimeError:  # the loop changed the counter while it was copied
                continue
        return {}

    # -- submitting -----------------------------------------------------------------------------
    def submit(self, tenant: str, keys: list[bytes], texts: list[str], namespaces: list[str], *,
               lane: str | None = None, admit: bool = True) -> Work:
        """Queue distinct missing texts; raises OverloadedError when over a limit (``admit``)."""
        n = len(keys)
        if admit:
            if self._tenant_waiting[tenant] + n > self.tenant_queue_texts:
                self._reject("tenant", f"tenant {tenant!r} has {self._tenant_waiting[tenant]} texts waiting for the "
                             f"backbone; at most {self.tenant_queue_texts} may wait (this request adds {n})")
            if self._waiting + n > self.queue_texts:
                self._reject("global", f"the backbone queue holds {self._waiting} texts; at most {self.queue_texts} "
                             f"may wait (this request adds {n})")
        assert self._loop is not None, "Scheduler.start() was not awaited"
        work = Work(lane or tenant, tenant, keys, texts, namespaces,
                    [estimate_tokens(t, self.max_length) for t in texts],
                    self._loop.create_future(), time.perf_counter())
        lane_ = self._lanes.get(work.lane)
        if lane_ is None:
            lane_ = self._lanes[work.lane] = _Lane()
        lane_.queue.append(work)
        self.submitted_texts += n
        lane_.waiting += n
        self._tenant_waiting[tenant] += n
        self._waiting += n
        self._turn.setdefault(work.lane, None)
        self._wake.set()
        return work

    def _reject(self, scope: str, message: str) -> None:
        self.rejected += 1
        self.metrics.rejected(scope)
        backlog = self._waiting + self.in_flight
        retry = math.ceil(backlog / self._rate) if self._rate > 0 else 1
        raise OverloadedError(message + "; retry later", retry_after=float(min(max(retry, 1), 60)))

    async def run(self, tenant: str, keys: list[bytes], texts: list[str], namespaces: list[str], *,
                  disconnected: Callable[[], Awaitable[Any]] | None = None, lane: str | None = None,
                  admit: bool = True) -> tuple[dict[bytes, tuple], dict[str, float]]:
        """Queue and await; returns ``(answers by key, {"queue": ms, "embed": ms})``.

        ``disconnected`` is awaited beside the work (an ASGI ``receive`` after the body was read
        returns only when the client goes): if it finishes first, the work is dropped.
        """
        work = self.submit(tenant, keys, texts, namespaces, lane=lane, admit=admit)
        watcher = asyncio.ensure_future(disconnected()) if disconnected is not None else None
        try:
            if watcher is None:
                await asyncio.shield(work.future)
            else:
                await asyncio.wait({work.future, watcher}, return_when=asyncio.FIRST_COMPLETED)
                if not work.future.done():
                    msg = watcher.result() if watcher.done() and not watcher.cancelled() else None
                    if not isinstance(msg, dict) or msg.get("type") == "http.disconnect":
                        self.drop(work)
                        raise ClientGoneError("the client disconnected before its texts were embedded")
                    await asyncio.shield(work.future)
        except asyncio.CancelledError:
            self.drop(work)
            raise
        finally:
            if watcher is not None and not watcher.done():
                watcher.cancel()
        done = time.perf_counter()
        started = work.started if work.started is not None else done
        return work.future.result(), {"queue": (started - work.enqueued) * 1e3, "embed": (done - started) * 1e3}

    def run_from_thread(self, tenant: str, keys: list[bytes], texts: list[str], namespaces: list[str], *,
                        lane: str) -> dict[bytes, tuple]:
        """For worker threads (training jobs): queue without admission control and block until done."""
        assert self._loop is not None
        fut = asyncio.run_coroutine_threadsafe(
            self.run(tenant, keys, texts, namespaces, lane=lane, admit=False), self._loop)
        return fut.result()[0]

    def drop(self, work: Work) -> None:
        """Forget a request whose client has gone; texts already in a batch still finish (and are cached)."""
        if work.gone or work.future.done():
            return
        work.gone = True
        self.dropped_requests += 1
        left = work.waiting
        self.dropped_texts += left
        self.metrics.dropped(left)
        self._unqueue(work, left)
        work.next = len(work.keys)
        lane = self._lanes.get(work.lane)
        if lane is not None:
            try:
                lane.queue.remove(work)
            except ValueError:
                pass
            if not lane.queue:
                self._retire(work.lane)
        work.future.cancel()

    def _unqueue(self, work: Work, n: int) -> None:
        lane = self._lanes.get(work.lane)
        if lane is not None:
            lane.waiting -= n
        self._tenant_waiting[work.tenant] -= n
        if self._tenant_waiting[work.tenant] <= 0:
            del self._tenant_waiting[work.tenant]
        self._waiting -= n

    def _retire(self, lane_id: str) -> None:
        self._turn.pop(lane_id, None)
        lane = self._lanes.get(lane_id)
        if lane is not None and not lane.queue:
            del self._lanes[lane_id]

    # -- packing ---------------------------------------------------------------------------------
    def pack(self, exclude: frozenset[str] | set[str] = frozenset()) -> list[tuple[Work, int]]:
        """Take the next batch: ``[(work, index of text)]`` by deficit round-robin over lanes,
        leaving out the lanes in ``exclude``."""
        rows: list[tuple[Work, int]] = []
        tokens = 0
        while len(rows) < self.batch_texts:
            lane_id = next((lane for lane in self._turn if lane not in exclude), None)
            if lane_id is None:
                break
            lane = self._lanes[lane_id]
            lane.deficit += self.quantum
            full = False
            while lane.queue:
                work = lane.queue[0]
                cost = work.costs[work.next]
                if cost > lane.deficit:
                    break
                if len(rows) >= self.batch_texts or (rows and tokens + cost > self.batch_tokens):
                    full = True
                    break
                rows.append((work, work.next))
                tokens += cost
                lane.deficit -= cost
                work.next += 1
                self._unqueue(work, 1)
                if work.next == len(work.keys):
                    lane.queue.popleft()
            if not lane.queue:
                lane.deficit = 0
                self._retire(lane_id)
            elif full:
                lane.deficit -= self.quantum  # its turn did not happen; it goes first next batch
                break
            else:
                self._turn.move_to_end(lane_id)
        return rows

    async def _run(self) -> None:
        """Dispatch batches while a worker is free. A second batch may start while one runs only
        for lanes the running batch does not serve: one forward already keeps every core busy, so
        this costs the flooding tenant nothing, and another tenant's text starts at once, sharing
        the CPU, instead of waiting for the flood's batch to end."""
        loop = asyncio.get_running_loop()
        tasks: set[asyncio.Task] = set()
        while True:
            self._wake.clear()
            rows: list[tuple[Work, int]] = []
            if self._turn and len(self._in_flight) < self.workers:
                busy = set().union(*self._in_flight.values()) if self._in_flight else set()
                rows = self.pack(exclude=busy)
            if not rows:
                await self._wake.wait()
                continue
            self._batch_ids += 1
            bid = self._batch_ids
            self._in_flight[bid] = {w.lane for w, _ in rows}
            task = asyncio.create_task(self._process(loop, rows, bid))
            tasks.add(task)
            task.add_done_callback(tasks.discard)

    async def _process(self, loop: asyncio.AbstractEventLoop, rows: list[tuple[Work, int]], bid: int) -> None:
        try:
            await self._compute_batch(loop, rows, bid)
        finally:
            self._in_flight.pop(bid, None)
            self._wake.set()

    async def _compute_batch(self, loop: asyncio.AbstractEventLoop, rows: list[tuple[Work, int]], bid: int = 0) -> None:
        askers: dict[bytes, list[tuple[Work, int]]] = {}  # requests asking the same key in one batch: once
        for work, i in rows:
            askers.setdefault(work.keys[i], []).append((work, i))
        keys, groups, small = self.order(rows)
        first = {k: a[0] for k, a in askers.items()}
        texts = [first[k][0].texts[first[k][1]] for k in keys]
        namespaces = [first[k][0].namespaces[first[k][1]] for k in keys]
        costs = [first[k][0].costs[first[k][1]] for k in keys]
        t0 = time.perf_counter()
        for work, _ in rows:
            if work.started is None:
                work.started = t0
                self.metrics.queued(t0 - work.enqueued)
        self.in_flight += len(keys)
        # rows of each lane not yet answered, and keys answered (for in_flight), updated on the loop
        state = {"left": collections.Counter(work.lane for work, _ in rows), "answered": 0}

        def piece_done(piece_keys: list[bytes], filled: Filled) -> None:  # in the worker thread
            loop.call_soon_threadsafe(self._deliver, askers, piece_keys, filled, bid, state, small)

        try:
            await loop.run_in_executor(self._compute, self._fill_yielding, bid, keys, texts, namespaces, costs,
                                       groups, piece_done)
        except Exception as exc:  # the backbone failed: every request still waiting in the batch gets the error
            log.exception("backbone batch of %d texts failed", len(keys))
            err = BackendError(f"embedding failed: {type(exc).__name__}: {exc}")
            for work, _ in rows:
                if not work.future.done():
                    work.future.set_exception(err)
            return
        finally:
            self.in_flight -= len(keys) - state["answered"]
        seconds = time.perf_counter() - t0
        self.batches += 1
        self._rate = len(keys) / seconds if self._rate == 0 else 0.8 * self._rate + 0.2 * len(keys) / max(seconds, 1e-6)
        self.metrics.batch(len(keys), sum(w.costs[i] for w, i in rows), seconds)

    def order(self, rows: list[tuple[Work, int]]) -> tuple[list[bytes], list[int], frozenset[str]]:
        """A batch's distinct keys in the order its pieces compute them, each key's piece group, and
        the batch's small lanes.

        Lanes with the fewest estimated tokens in the batch go first, so a tenant's single text
        packed beside a flood's rows is in the first piece and answered when that piece ends, not
        when the batch does; a key asked by several lanes goes with the smallest of them. Lanes of
        at most ``yield_tokens`` (the small lanes) share group 0, so several small tenants still
        ride one forward; each bigger lane is a group of its own, and a piece never spans two
        groups. Without ``yield_tokens`` (a GPU: one forward per batch) the packing order stays and
        no lane is small."""
        lane_tokens: collections.Counter[str] = collections.Counter()
        lanes: dict[bytes, list[str]] = {}
        for work, i in rows:
            lanes.setdefault(work.keys[i], []).append(work.lane)
            lane_tokens[work.lane] += work.costs[i]
        if self.yield_tokens is None:
            return list(lanes), [0] * len(lanes), frozenset()
        rank = {lane: n for n, (lane, _) in enumerate(sorted(lane_tokens.items(), key=lambda kv: kv[1]))}
        lane_of = {k: min(ls, key=rank.__getitem__) for k, ls in lanes.items()}
        ordered = sorted(lanes, key=lambda k: rank[lane_of[k]])  # stable: packing order within a lane
        small = frozenset(lane for lane, n in lane_tokens.items() if n <= self.yield_tokens)
        groups = [0 if lane_of[k] in small else 1 + rank[lane_of[k]] for k in ordered]
        return ordered, groups, small

    def _deliver(self, askers: dict[bytes, list[tuple[Work, int]]], keys: list[bytes], filled: Filled,
                 bid: int, state: dict, small: frozenset[str]) -> None:
        """On the loop: one piece's answers to the requests that asked its keys (a request whose texts
        are all answered is resolved now, before the rest of its batch), then its remote write
        queued. A small lane (``order``) with no rows left in the batch is free again: its next
        request may start a batch beside this one instead of waiting for it to end. Flood lanes stay
        busy until the batch ends, as before: released early, two floods would land in batches of
        their own, and the slightly smaller one would keep pausing the other (review, 1 Dec)."""
        try:
            answers = filled.answers(keys)
            for key in keys:
                for n, (work, _) in enumerate(askers[key]):
                    vec, tier, trunc, computed, corrupt = answers[key]
                    if n:  # computed once for the first asker; a batch-mate sees it as a miss filled
                        computed, corrupt = False, 0
                    work.answers[key] = Answer(vec, tier, trunc, computed, corrupt)
                    work.answered += 1
                    if work.answered == len(work.keys) and not work.future.done():
                        work.future.set_result(work.answers)
                    state["left"][work.lane] -= 1
                    if work.lane in small and not state["left"][work.lane] and bid in self._in_flight:
                        self._in_flight[bid].discard(work.lane)
                        self._wake.set()
            state["answered"] += len(keys)
            self.in_flight -= len(keys)
        except Exception as exc:  # never leave a request of this piece waiting for ever
            log.exception("delivering a piece of %d texts failed", len(keys))
            err = BackendError(f"embedding failed: {type(exc).__name__}: {exc}")
            for key in keys:
                for work, _ in askers[key]:
                    if not work.future.done():
                        work.future.set_exception(err)
            return
        if filled.write[0]:
            try:
                self._writer.submit(self._write_back, filled)
            except RuntimeError:  # stop() has shut the writer: the vectors stay in the in-process tiers
                log.warning("remote-tier write of %d vectors skipped: the scheduler is stopping", len(filled.write[0]))

    def _fill_yielding(self, bid: int, keys: list[bytes], texts: list[str], namespaces: list[str],
                       costs: list[int], groups: list[int],
                       piece_done: Callable[[list[bytes], Filled], None]) -> None:
        """``fill`` for one batch (in a worker thread): in pieces of about ``yield_tokens`` estimated
        tokens, never spanning two ``groups``, each piece waiting while a batch of at most half as many
        tokens runs;
        ``piece_done(keys, filled)`` after each piece."""
        total = sum(costs)
        if self.yield_tokens is None or total <= self.yield_tokens:  # (then every lane is in group 0)
            pieces = [(0, len(keys))]
        else:
            pieces, start, acc = [], 0, 0
            for j, c in enumerate(costs):
                if acc and (acc + c > self.yield_tokens or groups[j] != groups[j - 1]):
                    pieces.append((start, j))
                    start, acc = j, 0
                acc += c
            pieces.append((start, len(keys)))
        with self._yield:
            self._running_tokens[bid] = total
        try:
            for a, b in pieces:
                if len(pieces) > 1:  # wait while a batch of at most half this one's tokens runs
                    with self._yield:
                        while any(2 * t <= total for other, t in self._running_tokens.items() if other != bid):
                            self._yield.wait()
                piece_done(keys[a:b], self._fill(keys[a:b], texts[a:b], namespaces[a:b]))
        finally:
            with self._yield:
                self._running_tokens.pop(bid, None)
                self._yield.notify_all()

    def _write_back(self, filled) -> None:
        try:
            self._write_back_fn(filled)
        except Exception:  # the tiers count their own failures; never let the writer thread die
            log.exception("write-back to the remote tier failed")
