"""Alert webhooks: each alert POSTed as JSON to the classifier's ``webhook`` URL, off the request path.

One sender thread drains a bounded queue; a delivery gets ``ATTEMPTS`` tries with exponential
back-off (0.5 s, 1 s, ...) and a ``TIMEOUT_S`` per try. A delivery that fails every try, or an
alert that finds the queue full, is counted in ``failures`` (exported on /metrics) and dropped —
a slow or dead receiver never blocks monitoring, let alone a request.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
import urllib.error
import urllib.request

log = logging.getLogger(__name__)

ATTEMPTS = 3
TIMEOUT_S = 5.0
QUEUE_MAX = 1000


class WebhookSender:
    def __init__(self, attempts: int = ATTEMPTS, timeout_s: float = TIMEOUT_S, backoff_s: float = 0.5):
        self.attempts, self.timeout_s, self.backoff_s = attempts, timeout_s, backoff_s
        self.sent = 0
        self.failures = 0
        self._queue: queue.Queue = queue.Queue(QUEUE_MAX)
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def send(self, url: str, payload: dict) -> None:
        """Queue ``payload`` for ``url``; returns at once (a full queue counts a failure)."""
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="headfleet-webhooks", daemon=True)
                self._thread.start()
        try:
            self._queue.put_nowait((url, payload))
        except queue.Full:
            self.failures += 1
            log.warning("webhook queue full; alert for %s dropped", payload.get("classifier"))

    def join(self, timeout_s: float = 30.0) -> None:
        """Wait until every queued alert was delivered or given up (tests, shutdown)."""
        deadline = time.monotonic() + timeout_s
        while self._queue.unfinished_tasks and time.monotonic() < deadline:
            time.sleep(0.02)

    def _run(self) -> None:
        while True:
            url, payload = self._queue.get()
            try:
                self._deliver(url, payload)
            finally:
                self._queue.task_done()

    def _deliver(self, url: str, payload: dict) -> None:
        body = json.dumps(payload).encode("utf-8")
        for attempt in range(self.attempts):
            req = urllib.request.Request(url, data=body, method="POST",
                                         headers={"Content-Type": "application/json", "User-Agent": "headfleet"})
            try:
                with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
                    if 200 <= resp.status < 300:
                        self.sent += 1
                        return
            except (urllib.error.URLError, OSError, ValueError) as e:
                log.info("webhook delivery %d/%d failed: %s", attempt + 1, self.attempts, e)
            if attempt + 1 < self.attempts:
                time.sleep(self.backoff_s * 2**attempt)
        self.failures += 1
