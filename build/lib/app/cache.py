"""The two-level prediction cache: a per-worker LRU (L1) in front of Redis (L2).

Keys hash the model name, the version that answers and the float32 bytes the
model sees, so a new version never returns an old version's answer. Values are
the cacheable part of a response, as JSON bytes. Redis trouble never fails a
prediction: every Redis call goes through a circuit breaker, errors are misses,
and writes happen on a background thread so a miss costs one round trip.
"""
from __future__ import annotations

import hashlib
import logging
import os
import queue
import struct
import sys
import threading
import time
import zlib
from collections import OrderedDict
from multiprocessing.sharedctypes import RawArray
from typing import NamedTuple

import pybreaker
import redis

from app.metrics import Metrics
from app.redis_client import connect

log = logging.getLogger(__name__)
KEY_PREFIX = "mlserve:p:"
GENERATION_SLOTS = 4096
# Cached predictions waiting to be written to Redis, per worker.
MAX_PENDING_WRITES = 10_000


class Generations:
    """Per-model invalidation counters in memory shared by every worker of a
    host (allocated in the master before fork). An L1 entry is valid only
    while its model's counter is unchanged. Models hash to slots; a collision
    only invalidates more than asked."""

    def __init__(self, slots: int = GENERATION_SLOTS):
        self.counters = RawArray("Q", slots)
        self.slots: dict[str, int] = {}

    def slot(self, name: str) -> int:
        slot = self.slots.get(name)
        if slot is None:
            if len(self.slots) >= len(self.counters):  # names come from messages too: bounded
                self.slots.clear()
            slot = self.slots[name] = zlib.crc32(name.encode()) % len(self.counters)
        return slot

    def current(self, name: str) -> int:
        return self.counters[self.slot(name)]

    def bump(self, name: str | None) -> None:
        if name is None:
            for i in range(len(self.counters)):
                self.counters[i] += 1
        else:
            self.counters[self.slot(name)] += 1


# What one entry costs beyond its key and value: the (expires, generation,
# value) tuple and the float in it (the generation is a cached small int).
ENTRY_OVERHEAD = sys.getsizeof((0.0, 0, b"")) + sys.getsizeof(0.0)
SMALL_INT = 256


def compact(value: bytes) -> bytes:
    """An exact-size copy. orjson's dumps() returns bytes that keep a ~4 KB
    buffer whatever their length; kept for minutes in a cache, that buffer
    would be the cost, not the value."""
    return bytes(memoryview(value))


class LRU:
    """Bounded by entry count and by bytes; entries expire after ttl seconds.
    Bytes are what the worker's memory holds for the cache: every key and value
    object, each entry's tuple, and the container's own table and nodes
    (sys.getsizeof of the OrderedDict, which grows in steps). Values must be
    compact (see compact())."""

    def __init__(self, max_entries: int, max_bytes: int, ttl: float, clock=time.monotonic):
        self.max_entries, self.max_bytes, self.ttl, self.clock = max_entries, max_bytes, ttl, clock
        self.entries: OrderedDict[bytes, tuple[float, int, bytes]] = OrderedDict()
        self.item_bytes = 0
        self.lock = threading.Lock()  # gthread workers share one LRU between threads

    @property
    def bytes(self) -> int:
        return self.item_bytes + sys.getsizeof(self.entries)

    def get(self, key: bytes, generation: int) -> bytes | None:
        with self.lock:
            entry = self.entries.get(key)
            if entry is None:
                return None
            if entry[0] < self.clock() or entry[1] != generation:
                self.discard(key)
                return None
            self.entries.move_to_end(key)
            return entry[2]

    def put(self, key: bytes, generation: int, value: bytes) -> None:
        size = entry_size(key, generation, value)
        if size > self.max_bytes or self.max_entries == 0:
            return
        with self.lock:
            self.discard(key)
            self.entries[key] = (self.clock() + self.ttl, generation, value)
            self.item_bytes += size
            while self.entries and (len(self.entries) > self.max_entries or self.bytes > self.max_bytes):
                old, (_, old_generation, old_value) = self.entries.popitem(last=False)
                self.item_bytes -= entry_size(old, old_generation, old_value)

    def discard(self, key: bytes) -> None:
        entry = self.entries.pop(key, None)
        if entry is not None:
            self.item_bytes -= entry_size(key, entry[1], entry[2])

    def clear(self) -> None:
        with self.lock:
            self.entries = OrderedDict()  # a fresh table: clear() keeps the old one's size
            self.item_bytes = 0

    def __len__(self) -> int:
        return len(self.entries)


def entry_size(key: bytes, generation: int, value: bytes) -> int:
    extra = sys.getsizeof(generation) if generation > SMALL_INT else 0
    return sys.getsizeof(key) + sys.getsizeof(value) + ENTRY_OVERHEAD + extra


class BreakerMetrics(pybreaker.CircuitBreakerListener):
    STATES = {pybreaker.STATE_CLOSED: 0, pybreaker.STATE_HALF_OPEN: 1, pybreaker.STATE_OPEN: 2}

    def __init__(self, metrics: Metrics):
        self.metrics = metrics

    def state_change(self, cb, old_state, new_state) -> None:
        name = new_state.name
        (log.warning if name == pybreaker.STATE_OPEN else log.info)(
            "redis circuit breaker %s -> %s", old_state.name if old_state else "none", name)
        self.metrics.breaker_changed(self.STATES[name], name)


class RedisStore:
    """L2: Redis behind a circuit breaker. Reads never raise; writes are queued
    and pipelined by a background thread; nothing waits on a sick Redis for
    longer than the socket timeout, and not at all while the breaker is open."""

    def __init__(self, url: str, ttl: int, connect_timeout: float, socket_timeout: float,
                 pool_size: int, breaker: pybreaker.CircuitBreaker, metrics: Metrics):
        self.url, self.ttl, self.breaker, self.metrics = url, ttl, breaker, metrics
        self.options = dict(connect_timeout=connect_timeout, socket_timeout=socket_timeout,
                            max_connections=pool_size)
        self.pid = None
        self.client: redis.Redis | None = None
        self.writes: queue.SimpleQueue | None = None
        self.pending = 0  # items queued for writing, at most MAX_PENDING_WRITES
        self.pending_lock = threading.Lock()

    def connection(self) -> redis.Redis:
        # Sockets and threads belong to one process: made anew after a fork.
        if self.pid != os.getpid():
            self.pid = os.getpid()
            self.client = connect(self.url, **self.options)
            self.writes = queue.SimpleQueue()
            self.pending = 0
            threading.Thread(target=self.write_loop, name="cache-writer", daemon=True).start()
        return self.client

    def call(self, method: str, *args):
        """Run a Redis command through the breaker; None when Redis is unavailable."""
        client = self.connection()
        started = time.perf_counter()
        try:
            result = self.breaker.call(getattr(client, method), *args)
        except (pybreaker.CircuitBreakerError, redis.RedisError, OSError):
            return None
        self.metrics.observe_l2(time.perf_counter() - started)
        return result

    def get(self, key: bytes) -> bytes | None:
        return self.call("get", key)

    def get_many(self, keys: list[bytes]) -> list:
        return self.call("mget", keys) or [None] * len(keys)

    def put_many(self, items: list[tuple[bytes, bytes]]) -> None:
        self.connection()
        with self.pending_lock:
            # A slow Redis must not grow memory or block requests: beyond the
            # bound, writes are dropped (the next miss writes them again).
            if self.pending + len(items) > MAX_PENDING_WRITES:
                return
            self.pending += len(items)
        self.writes.put(items)

    def write_loop(self) -> None:
        while True:
            items = self.writes.get()
            while not self.writes.empty() and len(items) < 1000:  # coalesce into one pipeline
                items = items + self.writes.get()
            self.write(items)
            with self.pending_lock:
                self.pending -= len(items)

    def write(self, items: list[tuple[bytes, bytes]]) -> None:
        def pipeline():
            with self.client.pipeline(transaction=False) as pipe:
                for key, value in items:
                    pipe.set(key, value, ex=self.ttl)
                pipe.execute()
        try:
            self.breaker.call(pipeline)
        except (pybreaker.CircuitBreakerError, redis.RedisError, OSError):
            pass

    def delete_model(self, name: str | None) -> int | None:
        """Delete cached predictions of one model (or all) with SCAN + UNLINK,
        never KEYS. None when Redis is unavailable."""
        pattern = f"{KEY_PREFIX}{name}:*" if name else f"{KEY_PREFIX}*"
        client = self.connection()

        def scan_and_unlink() -> int:
            deleted, batch = 0, []
            for key in client.scan_iter(match=pattern, count=1000):
                batch.append(key)
                if len(batch) >= 1000:
                    deleted += client.unlink(*batch)
                    batch = []
            return deleted + (client.unlink(*batch) if batch else 0)
        try:
            return self.breaker.call(scan_and_unlink)
        except (pybreaker.CircuitBreakerError, redis.RedisError, OSError) as exc:
            log.warning("cache invalidation could not reach Redis: %s", exc)
            return None


class KeyFormat(NamedTuple):
    prefix: bytes        # mlserve:p:<name>:<version>:
    row: struct.Struct   # one row as the float32 bytes the model sees (numpy's tobytes() of it)


class PredictionCache:
    """Keys are the model's prefix (name and version) followed by the row's
    float32 bytes. L1 uses them as they are (a dict lookup hashes them for
    free); Redis gets a fixed-size key, the prefix and a blake2b of the bytes,
    computed only when L1 misses."""

    MAX_FORMATS = 1024

    def __init__(self, l1: LRU | None, l2: RedisStore | None, generations: Generations, metrics: Metrics):
        self.l1, self.l2, self.generations, self.metrics = l1, l2, generations, metrics
        self.formats: dict = {}  # LoadedModel -> KeyFormat

    def key_format(self, model) -> KeyFormat:
        found = self.formats.get(model)
        if found is None:
            if len(self.formats) >= self.MAX_FORMATS:  # models come and go with swaps
                self.formats.clear()
            found = self.formats[model] = KeyFormat(f"{KEY_PREFIX}{model.name}:{model.version}:".encode(),
                                                    struct.Struct(f"<{model.n_features}f"))
        return found

    def key(self, model, row: list) -> bytes:
        """The key of one validated row (a list of numbers in feature order)."""
        fmt = self.key_format(model)
        return fmt.prefix + fmt.row.pack(*row)

    def keys(self, model, X) -> list[bytes]:
        """The keys of the rows of a float32 matrix."""
        prefix, data, width = self.key_format(model).prefix, X.tobytes(), X.shape[1] * 4
        return [prefix + data[i:i + width] for i in range(0, len(data), width)]

    def shared_key(self, model, key: bytes) -> bytes:
        prefix = self.key_format(model).prefix
        return prefix + hashlib.blake2b(key[len(prefix):], digest_size=16).hexdigest().encode()

    def get(self, model, key: bytes) -> tuple[str | None, bytes | None]:
        """(level, value) of a hit, or (None, None)."""
        generation = self.generations.current(model.name)
        if self.l1 is not None:
            value = self.l1.get(key, generation)
            self.metrics.cache_lookup("l1", model.name, value is not None)
            if value is not None:
                return "l1", value
        if self.l2 is not None:
            value = self.l2.get(self.shared_key(model, key))
            self.metrics.cache_lookup("l2", model.name, value is not None)
            if value is not None:
                if self.l1 is not None:
                    self.l1.put(key, generation, value)
                return "l2", value
        return None, None

    def put(self, model, key: bytes, value: bytes) -> None:
        value = compact(value)
        if self.l1 is not None:
            self.l1.put(key, self.generations.current(model.name), value)
        if self.l2 is not None:
            self.l2.put_many([(self.shared_key(model, key), value)])

    def get_many(self, model, keys: list[bytes]) -> list[tuple[str | None, bytes | None]]:
        generation = self.generations.current(model.name)
        found: list[tuple[str | None, bytes | None]] = [(None, None)] * len(keys)
        missing = list(range(len(keys)))
        if self.l1 is not None:
            for i, key in enumerate(keys):
                value = self.l1.get(key, generation)
                if value is not None:
                    found[i] = ("l1", value)
            missing = [i for i in missing if found[i][1] is None]
            self.metrics.cache_lookup("l1", model.name, True, len(keys) - len(missing))
            self.metrics.cache_lookup("l1", model.name, False, len(missing))
        if self.l2 is not None and missing:
            values = self.l2.get_many([self.shared_key(model, keys[i]) for i in missing])
            hits = 0
            for i, value in zip(missing, values):
                if value is not None:
                    found[i] = ("l2", value)
                    hits += 1
                    if self.l1 is not None:
                        self.l1.put(keys[i], generation, value)
            self.metrics.cache_lookup("l2", model.name, True, hits)
            self.metrics.cache_lookup("l2", model.name, False, len(missing) - hits)
        return found

    def put_many(self, model, items: list[tuple[bytes, bytes]]) -> None:
        items = [(key, compact(value)) for key, value in items]
        if self.l1 is not None:
            generation = self.generations.current(model.name)
            for key, value in items:
                self.l1.put(key, generation, value)
        if self.l2 is not None and items:
            self.l2.put_many([(self.shared_key(model, key), value) for key, value in items])

    def invalidate_local(self, name: str | None) -> None:
        """Drop L1 entries of one model (or all) in every worker of this host."""
        self.generations.bump(name)

    def invalidate_shared(self, name: str | None) -> int | None:
        """Delete L2 entries; the number deleted, or None without a reachable Redis."""
        return self.l2.delete_model(name) if self.l2 is not None else None
