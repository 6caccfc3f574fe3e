"""Unit tests of the cache's own logic: the LRU's bounds and expiry, key
derivation, and generations. (Redis behaviour is tested against a real Redis
in test_cache_server.py.)"""
from __future__ import annotations

import sys
import tracemalloc

import numpy as np
import orjson

from app.cache import LRU, Generations, PredictionCache
from app.metrics import Metrics


class FakeClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_lru_evicts_least_recently_used_beyond_max_entries():
    lru = LRU(max_entries=2, max_bytes=1 << 20, ttl=60)
    lru.put(b"a", 0, b"1")
    lru.put(b"b", 0, b"2")
    assert lru.get(b"a", 0) == b"1"      # a is now the most recent
    lru.put(b"c", 0, b"3")
    assert lru.get(b"b", 0) is None
    assert lru.get(b"a", 0) == b"1" and lru.get(b"c", 0) == b"3"
    assert len(lru) == 2


def test_lru_is_bounded_by_bytes():
    # Room for the container with three entries, not four.
    three = LRU(10, 1 << 20, 60)
    for i in range(3):
        three.put(b"k%d" % i, 0, b"x" * 30)
    lru = LRU(max_entries=1000, max_bytes=three.bytes + 20, ttl=60)
    for i in range(10):
        lru.put(b"k%d" % i, 0, b"x" * 30)
    # Churn leaves the table larger than three fresh entries need: two may be all that fit.
    assert lru.bytes <= lru.max_bytes and 2 <= len(lru) <= 3
    assert lru.get(b"k9", 0) is not None and lru.get(b"k0", 0) is None
    lru.put(b"huge", 0, b"x" * 2000)        # larger than the whole cache: not kept
    assert lru.get(b"huge", 0) is None and lru.get(b"k9", 0) is not None


def test_lru_counts_objects_not_just_their_bytes():
    lru = LRU(10, 1 << 20, 60)
    empty = lru.bytes
    lru.put(b"k", 0, b"v")
    # A one-byte key and value cost their object headers, the entry and a table slot.
    assert lru.bytes - empty >= sys.getsizeof(b"k") + sys.getsizeof(b"v") + sys.getsizeof((0.0, 0, b""))


def test_a_filled_lru_holds_what_its_setting_says_within_10_percent():
    """Filled through PredictionCache with real predictions' values (orjson's
    over-allocated bytes), measured by tracemalloc, over a churn of 3x what fits."""
    limit = 8 << 20
    model = Model("iris_classifier", 1, 4)
    rng = np.random.default_rng(0)
    rows = rng.random((60_000, 4), dtype=np.float32).tolist()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    cache = PredictionCache(LRU(10_000_000, limit, 60), None, Generations(16), Metrics())
    for i, row in enumerate(rows):
        value = orjson.dumps({"prediction": i % 3, "probability": 0.97,
                              "probabilities": {"0": 0.97, "1": 0.02, "2": 0.01}})
        cache.put(model, cache.key(model, row), value)
    held = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    assert 20_000 < len(cache.l1) < 40_000  # the byte bound binds, not the entry count
    assert cache.l1.bytes <= limit
    assert abs(held - limit) / limit < 0.10, (held, limit)


def test_lru_entries_expire_after_ttl():
    clock = FakeClock()
    lru = LRU(max_entries=10, max_bytes=1000, ttl=5, clock=clock)
    lru.put(b"a", 0, b"1")
    clock.now += 4.9
    assert lru.get(b"a", 0) == b"1"
    clock.now += 0.2
    assert lru.get(b"a", 0) is None
    assert len(lru) == 0 and lru.item_bytes == 0 and lru.bytes == sys.getsizeof(lru.entries)


def test_lru_entry_from_an_older_generation_is_a_miss():
    lru = LRU(max_entries=10, max_bytes=1000, ttl=60)
    lru.put(b"a", 3, b"1")
    assert lru.get(b"a", 4) is None
    assert lru.get(b"a", 3) is None  # dropped on the failed lookup


def test_generations_bump_one_model_or_all():
    generations = Generations(slots=64)
    before = generations.current("iris"), generations.current("wine")
    generations.bump("iris")
    assert generations.current("iris") == before[0] + 1
    generations.bump(None)
    assert generations.current("iris") == before[0] + 2 and generations.current("wine") == before[1] + 1


class Model:
    """What the cache reads of a model."""

    def __init__(self, name: str = "iris", version: int = 1, n_features: int = 4):
        self.name, self.version, self.n_features = name, version, n_features


def test_keys_differ_by_version_and_by_the_float32_features():
    cache = PredictionCache(None, None, Generations(16), Metrics())
    row = np.array([5.1, 3.5, 1.4, 0.2], dtype=np.float32)
    v1_model, v2_model = Model(version=1), Model(version=2)
    v1 = cache.key(v1_model, row.tolist())
    assert v1 == cache.key(v1_model, row.copy().tolist())
    assert v1 != cache.key(v2_model, row.tolist())
    assert v1 != cache.key(v1_model, np.nextafter(row, 10, dtype=np.float32).tolist())
    # 5.1 as float64 rounds to the same float32 the model sees: same key.
    assert v1 == cache.key(v1_model, [5.1000000001, 3.5, 1.4, 0.2])
    assert v1 == b"mlserve:p:iris:1:" + row.tobytes()
    # A matrix's row keys are the single-row keys.
    assert cache.keys(v1_model, row.reshape(1, -1)) == [v1]


def test_shared_keys_are_fixed_size_and_keep_the_model_prefix():
    cache = PredictionCache(None, None, Generations(16), Metrics())
    wine = Model("wine", 3, 13)
    prefix = b"mlserve:p:wine:3:"
    wide = cache.key(wine, list(range(13)))
    shared = cache.shared_key(wine, wide)
    assert shared.startswith(prefix) and len(shared) == len(prefix) + 32
    other = cache.key(wine, list(range(1, 14)))
    assert cache.shared_key(wine, other) != shared


def test_cache_without_l2_serves_l1_and_counts_lookups():
    metrics = Metrics()
    cache = PredictionCache(LRU(10, 1000, 60), None, Generations(16), metrics)
    iris = Model()
    assert cache.get(iris, b"k") == (None, None)
    cache.put(iris, b"k", b"{}")
    assert cache.get(iris, b"k") == ("l1", b"{}")
    cache.invalidate_local("iris")
    assert cache.get(iris, b"k") == (None, None)
    text = metrics.render().decode()
    assert 'mlserve_cache_lookups_total{level="l1",model="iris",result="hit"} 1.0' in text
    assert 'mlserve_cache_lookups_total{level="l1",model="iris",result="miss"} 2.0' in text
