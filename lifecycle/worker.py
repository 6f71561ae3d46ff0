"""The wiring Experiments and Shadows share: hooks on the engine, and a background thread that
reloads an index from the store every ``refresh_s`` and flushes queued work every ``interval_s``.

A subclass sets ``HOOKS`` (engine attribute -> method name), ``THREAD`` (the thread's name) and
implements ``refresh()`` and ``flush(final=False)``. A tick that raises (a store outage) is logged
and retried at the next one; ``close`` stops the thread, unhooks, and flushes once more.
"""

from __future__ import annotations

import logging
import threading

log = logging.getLogger(__name__)


class StoreWorker:
    HOOKS: tuple[tuple[str, str], ...] = ()
    THREAD = "headfleet-lifecycle"

    def _init_worker(self) -> None:
        self._refreshed = float("-inf")
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def attach(self):
        self.refresh()
        for hooks, method in self.HOOKS:
            getattr(self.engine, hooks).append(getattr(self, method))
        return self

    def start(self):
        self._thread = threading.Thread(target=self._loop, name=self.THREAD, daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        for hooks, method in self.HOOKS if self.engine is not None else ():
            fn, registered = getattr(self, method), getattr(self.engine, hooks)
            if fn in registered:
                registered.remove(fn)
        try:
            self.flush(final=True)
        except Exception:
            log.exception("%s: the last flush failed", self.THREAD)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                if self.clock() - self._refreshed >= self.refresh_s:
                    self.refresh()
                self.flush()
            except Exception:  # a store outage or a bug: logged, retried next tick, never fatal
                log.exception("%s tick failed", self.THREAD)
