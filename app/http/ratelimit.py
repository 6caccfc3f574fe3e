"""Per-client rate limiting with the `limits` library.

requests_per_second and burst map to a moving window of `burst` requests per
ceil(burst / requests_per_second) seconds: a client may spend its burst at
once, and sustains requests_per_second on average. The window lives in each
worker's memory, or in Redis (shared by every worker and host) when one is
configured; if Redis fails, the request is let through rather than failed.
"""
from __future__ import annotations

import logging
import math
import time

import falcon
from limits import RateLimitItemPerSecond
from limits.storage import MemoryStorage, storage_from_string
from limits.strategies import MovingWindowRateLimiter

from app.errors import RateLimited

log = logging.getLogger(__name__)
EXEMPT = frozenset(("health", "ready", "metrics", "v2_health_live", "v2_health_ready"))


class RateLimit:
    """Falcon middleware: 429 with Retry-After once a client's window is spent."""

    def __init__(self, requests_per_second: int, burst: int, redis_url: str = ""):
        seconds = max(1, math.ceil(burst / requests_per_second))
        self.item = RateLimitItemPerSecond(burst, seconds)
        storage = storage_from_string(redis_url) if redis_url else MemoryStorage()
        self.limiter = MovingWindowRateLimiter(storage)

    def process_resource(self, req: falcon.Request, resp: falcon.Response, resource, params) -> None:
        # Probes and scrapes are never limited: a load balancer must see the truth.
        if getattr(resource, "endpoint", None) in EXEMPT:
            return
        key = req.remote_addr or "unknown"
        try:
            allowed = self.limiter.hit(self.item, key)
        except Exception as exc:  # storage trouble must never fail a prediction
            log.warning("rate limit storage unavailable, request allowed: %s", exc)
            return
        if not allowed:
            reset = self.limiter.get_window_stats(self.item, key).reset_time
            retry = max(1, math.ceil(reset - time.time()))
            raise RateLimited(f"rate limit of {self.item.amount} requests per {self.item.multiples} s exceeded",
                              retry_after=retry)
