"""Rate limits per API key (per client address when keys are off), with the
`limits` library's moving window.

The server's limit, requests_per_second with burst, is a window of `burst`
requests per ceil(burst / requests_per_second) seconds: a caller may spend its
burst at once and sustains requests_per_second on average. A key with a rate
of its own gets a window of `rate` requests per second instead.

The windows live in Redis when one is configured, so a limit holds across
every worker and host; if Redis fails, a circuit breaker sends each worker to
its own memory until Redis answers again: the limit then holds per worker,
and no request fails for it.
"""
from __future__ import annotations

import logging
import math
import time

import falcon
import pybreaker
from limits import RateLimitItem, RateLimitItemPerSecond
from limits.storage import MemoryStorage, storage_from_string
from limits.strategies import MovingWindowRateLimiter

from app.errors import RateLimited

log = logging.getLogger(__name__)
EXEMPT = frozenset(("health", "ready", "metrics", "v2_health_live", "v2_health_ready"))


def server_limit(requests_per_second: int, burst: int) -> RateLimitItem:
    return RateLimitItemPerSecond(burst, max(1, math.ceil(burst / requests_per_second)))


class BreakerLog(pybreaker.CircuitBreakerListener):
    def state_change(self, cb, old_state, new_state) -> None:
        if new_state.name == pybreaker.STATE_OPEN:
            log.warning("rate limits: Redis unavailable, each worker counts on its own until it answers")
        elif new_state.name == pybreaker.STATE_CLOSED:
            log.info("rate limits: counted in Redis again")


class RateLimit:
    """Falcon middleware (after authentication): 429 with Retry-After once a
    caller's window is spent."""

    def __init__(self, default: RateLimitItem | None, redis_url: str = "", redis_timeout: float = 0.05,
                 breaker_reset: float = 5.0):
        self.default = default
        self.local = MovingWindowRateLimiter(MemoryStorage())
        self.shared = None
        if redis_url:
            storage = storage_from_string(redis_url, socket_timeout=redis_timeout,
                                          socket_connect_timeout=redis_timeout)
            self.shared = MovingWindowRateLimiter(storage)
        # Three failures in a row open it: a worker's first call connects and
        # loads the moving window's script, which can overrun the socket
        # timeout on a busy machine without Redis being sick, and an open
        # breaker lets the worker count alone (up to twice the rate) meanwhile.
        self.breaker = pybreaker.CircuitBreaker(fail_max=3, reset_timeout=breaker_reset, listeners=[BreakerLog()])
        self.items: dict[int, RateLimitItem] = {}

    def process_resource(self, req: falcon.Request, resp: falcon.Response, resource, params) -> None:
        # Probes and scrapes are never limited: a load balancer must see the truth.
        if getattr(resource, "endpoint", None) in EXEMPT:
            return
        principal = req.context.get("principal")
        item = self.item(principal.rate) if principal is not None and principal.rate else self.default
        if item is None:
            return
        key = f"key:{principal.id}" if principal is not None else f"addr:{req.remote_addr or 'unknown'}"
        limiter, allowed = self.hit(item, key)
        if not allowed:
            reset = limiter.get_window_stats(item, key).reset_time
            retry = max(1, math.ceil(reset - time.time()))
            raise RateLimited(f"rate limit of {item.amount} requests per {item.multiples} s exceeded",
                              retry_after=retry)

    def hit(self, item: RateLimitItem, key: str) -> tuple[MovingWindowRateLimiter, bool]:
        """(the limiter that counted, whether the request is within the limit)."""
        if self.shared is not None:
            try:
                return self.shared, self.breaker.call(self.shared.hit, item, key)
            except pybreaker.CircuitBreakerError:
                pass  # open: Redis is not asked until the breaker's reset timeout has passed
            except Exception as exc:  # storage trouble never fails a request
                log.debug("rate limit storage failed: %s", exc)
        return self.local, self.local.hit(item, key)

    def item(self, rate: int) -> RateLimitItem:
        found = self.items.get(rate)
        if found is None:
            found = self.items[rate] = RateLimitItemPerSecond(rate, 1)
        return found
