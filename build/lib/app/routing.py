"""Traffic splits over a model's versions (A/B tests and canaries).

A request with a routing key (X-Routing-Key header or routing_key field) always
lands on the same version for the same split: the key's stable hash picks a
point in [0, 1) and the cumulative weights say whose slice it falls in.
Without a key, the point is random.
"""
from __future__ import annotations

import hashlib
import random
from bisect import bisect_right

from app.loader import LoadedModel


def parse_weights(raw) -> dict[int, float]:
    """{version: weight} from YAML/JSON ({"1": 90, "2": 10}); ValueError says why not."""
    if not isinstance(raw, dict) or not raw:
        raise ValueError("a split is a non-empty mapping of version to weight, e.g. {1: 90, 2: 10}")
    weights = {}
    for version, weight in raw.items():
        try:
            v = int(version)
        except (TypeError, ValueError):
            raise ValueError(f"split version {version!r} is not a positive integer") from None
        if v < 1 or isinstance(weight, bool) or not isinstance(weight, (int, float)) or not weight >= 0:
            raise ValueError(f"split {version!r}: {weight!r}: versions are positive integers, weights numbers >= 0")
        weights[v] = float(weight)
    if sum(weights.values()) <= 0:
        raise ValueError("split weights add up to 0")
    return weights


def key_point(key: str) -> float:
    """A stable point in [0, 1) for a routing key (the same on every host and run)."""
    digest = hashlib.blake2b(key.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2.0 ** 64


class Route:
    def __init__(self, weighted: list[tuple[LoadedModel, float]]):
        total = sum(w for _, w in weighted)
        self.models = [m for m, w in weighted if w > 0]
        running, self.bounds = 0.0, []
        for _, w in ((m, w) for m, w in weighted if w > 0):
            running += w / total
            self.bounds.append(running)
        self.bounds[-1] = 1.0
        self.weights = {m.version: w / total for m, w in weighted}

    def pick(self, key: str | None) -> LoadedModel:
        point = key_point(key) if key is not None else random.random()
        return self.models[min(bisect_right(self.bounds, point), len(self.models) - 1)]
