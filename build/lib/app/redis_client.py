"""Redis clients as this server makes them: short timeouts and no retries.
A failed command is for the circuit breaker (or the caller) to handle; a
retry inside redis-py would only double the wait on a sick Redis."""
from __future__ import annotations

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry


def connect(url: str, connect_timeout: float, socket_timeout: float | None = None, **options) -> redis.Redis:
    return redis.Redis.from_url(url, socket_connect_timeout=connect_timeout, socket_timeout=socket_timeout,
                                retry=Retry(NoBackoff(), 0), **options)
