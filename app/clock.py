"""The one source of timestamps: ISO 8601, UTC, with a Z."""
from __future__ import annotations

import time

_second = [-1, ""]


def utc_now(precise: bool = True) -> str:
    """Now, e.g. 2026-01-02T03:04:05.123456Z (precise) or 2026-01-02T03:04:05Z."""
    # PERF: responses carry a timestamp; the date part changes once a second,
    # so it is formatted once a second.
    now = time.time()
    second = int(now)
    if second != _second[0]:
        _second[:] = second, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
    if not precise:
        return _second[1] + "Z"
    return f"{_second[1]}.{int((now - second) * 1e6):06d}Z"


def utc_at(seconds: float) -> str:
    """A time.time() value in the same format as utc_now(), e.g. for records written later."""
    whole = int(seconds)
    return f"{time.strftime('%Y-%m-%dT%H:%M:%S', time.gmtime(whole))}.{int((seconds - whole) * 1e6):06d}Z"
