"""Shadow scoring: a candidate version also scores requests mirrored from the
serving one, on a background thread of each worker, never on the response
path. Agreement per (primary, shadow) version pair goes to the metrics."""
from __future__ import annotations

import logging
import os
import queue
import threading

import numpy as np

from app.loader import LoadedModel
from app.metrics import Metrics

log = logging.getLogger(__name__)
# Rows waiting for the shadow, per worker: a batch mirrors all its rows.
MAX_PENDING_ROWS = 10_000


class ShadowScorer:
    def __init__(self, metrics: Metrics):
        self.metrics = metrics
        self.pid: int | None = None
        self.pending: queue.SimpleQueue | None = None
        self.pending_rows = 0
        self.lock = threading.Lock()

    def submit(self, primary: LoadedModel, shadow: LoadedModel, X, labels: list) -> None:
        """Mirror rows X (a list for one row, or an array) answered with labels."""
        if self.pid != os.getpid():  # threads do not survive fork: one per worker
            self.pid = os.getpid()
            self.pending, self.pending_rows = queue.SimpleQueue(), 0
            threading.Thread(target=self.loop, name="shadow", daemon=True).start()
        with self.lock:
            if self.pending_rows + len(labels) > MAX_PENDING_ROWS:
                return  # a slow candidate drops mirrors, never requests
            self.pending_rows += len(labels)
        self.pending.put((primary, shadow, X, labels))

    def loop(self) -> None:
        while True:
            primary, shadow, X, labels = self.pending.get()
            try:
                self.compare(primary, shadow, X, labels)
            except Exception:
                log.exception("shadow scoring of %s v%s failed", shadow.name, shadow.version)
                self.metrics.shadow_error(primary, shadow)
            with self.lock:
                self.pending_rows -= len(labels)

    def compare(self, primary: LoadedModel, shadow: LoadedModel, X, labels: list) -> None:
        rows = np.array((X,) if isinstance(X, list) else X, dtype=np.float32)
        theirs = shadow.runtime.run(rows).labels.tolist()
        if primary.task == "regression":
            diffs = [abs(a - b) for a, b in zip(labels, theirs)]
            self.metrics.shadow_compared(primary, shadow, [d <= 1e-6 for d in diffs], diffs)
        else:
            self.metrics.shadow_compared(primary, shadow, [a == b for a, b in zip(labels, theirs)], None)
