"""Traffic splits: the observed share over many routing keys matches the
weights, and a key always lands on the same version."""
from __future__ import annotations

from collections import Counter

import pytest

from app.routing import Route, key_point, parse_weights


class Version:
    def __init__(self, version: int):
        self.version = version


@pytest.mark.parametrize("weights", [{1: 90, 2: 10}, {1: 50, 2: 50}, {1: 95, 2: 5}, {1: 70, 2: 20, 3: 10}])
def test_split_over_10000_keys_is_within_one_point_of_the_weights(weights):
    route = Route([(Version(v), w) for v, w in weights.items()])
    picks = Counter(route.pick(f"customer-{i}").version for i in range(10_000))
    total = sum(weights.values())
    for version, weight in weights.items():
        assert abs(picks[version] / 10_000 - weight / total) < 0.01, (version, picks)


def test_a_key_always_lands_on_the_same_version():
    route = Route([(Version(1), 80), (Version(2), 20)])
    for i in range(1000):
        key = f"user-{i}"
        assert len({route.pick(key).version for _ in range(5)}) == 1


def test_key_points_are_the_same_on_every_host_and_run():
    # Golden values: a salted hash (Python's hash()) or another digest would
    # move callers between versions when a worker, a host or a release changes.
    assert key_point("user-1") == 0.6041924073669338
    assert key_point("user-22") == 0.9758206144184534
    assert key_point("customer-42") == 0.20265168573428766
    assert key_point("") == 0.8931675160897388
    route = Route([(Version(1), 80), (Version(2), 20)])
    assert {k: route.pick(k).version for k in ("user-1", "user-2", "user-3", "user-22", "user-99")} == \
        {"user-1": 1, "user-2": 1, "user-3": 2, "user-22": 2, "user-99": 1}


def test_without_a_key_the_split_is_random_but_weighted():
    route = Route([(Version(1), 75), (Version(2), 25)])
    share = sum(route.pick(None).version == 2 for _ in range(20_000)) / 20_000
    assert 0.23 < share < 0.27


@pytest.mark.parametrize("bad", [{}, {"a": 1}, {"1": -1}, {"1": 0}, {"0": 5}, [1, 2], {"1": True}])
def test_bad_weights_are_refused(bad):
    with pytest.raises(ValueError):
        parse_weights(bad)
