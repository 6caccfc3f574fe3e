"""Metrics: requests are tallied in process and flushed into Prometheus
values; what a scrape shows is what was observed."""
from __future__ import annotations

import pytest
from prometheus_client.parser import text_string_to_metric_families

from app.metrics import BUCKETS, Metrics


def samples(metrics: Metrics) -> dict[tuple, float]:
    found = {}
    for family in text_string_to_metric_families(metrics.render().decode()):
        for s in family.samples:
            found[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return found


def value(metrics: Metrics, name: str, **labels) -> float | None:
    return samples(metrics).get((name, tuple(sorted(labels.items()))))


def test_requests_are_counted_by_model_version_endpoint_and_status():
    metrics = Metrics()
    for status in (200, 200, 422):
        metrics.observe("iris", "1", "predict", status, 0.0003)
    metrics.observe("", "", "health", 200, 0.00001)
    assert value(metrics, "mlserve_requests_total", model="iris", version="1", endpoint="predict", status="200") == 2
    assert value(metrics, "mlserve_requests_total", model="iris", version="1", endpoint="predict", status="422") == 1
    assert value(metrics, "mlserve_requests_total", model="", version="", endpoint="health", status="200") == 1


@pytest.mark.parametrize("seconds", [0.0001, BUCKETS[0], BUCKETS[3], 0.0031, 3.0])
def test_latency_lands_in_the_buckets_prometheus_would_use(seconds):
    metrics = Metrics()
    metrics.observe("iris", "1", "predict", 200, seconds)
    labels = dict(model="iris", version="1", endpoint="predict")
    for bound in BUCKETS:
        expected = 1.0 if seconds <= bound else 0.0
        assert value(metrics, "mlserve_request_duration_seconds_bucket", le=str(bound), **labels) == expected, bound
    assert value(metrics, "mlserve_request_duration_seconds_bucket", le="+Inf", **labels) == 1.0
    assert value(metrics, "mlserve_request_duration_seconds_sum", **labels) == pytest.approx(seconds)


def test_nothing_shows_before_a_flush_and_everything_after():
    metrics = Metrics()
    metrics.observe("iris", "1", "predict", 200, 0.001)
    metrics.cache_lookup("l1", "iris", True, 3)
    metrics.cache_lookup("l1", "iris", False)
    metrics.cache_lookup("l2", "iris", True, 0)  # nothing to count
    assert metrics.pending and metrics.pending_counts
    metrics.flush()
    assert not metrics.pending and not metrics.pending_counts
    assert value(metrics, "mlserve_cache_lookups_total", level="l1", model="iris", result="hit") == 3
    assert value(metrics, "mlserve_cache_lookups_total", level="l1", model="iris", result="miss") == 1
    assert value(metrics, "mlserve_cache_lookups_total", level="l2", model="iris", result="hit") is None


def test_swaps_serving_versions_and_breaker_state():
    metrics = Metrics()
    metrics.swapped([("iris", "swapped", "v2"), ("wine", "unchanged", "v1"), ("iris", "refused", "bad")])

    class Model:
        version = 2
    metrics.set_serving({"iris": Model()})
    metrics.breaker_changed(2, "open")
    assert value(metrics, "mlserve_model_swaps_total", model="iris", result="swapped") == 1
    assert value(metrics, "mlserve_model_swaps_total", model="iris", result="refused") == 1
    assert value(metrics, "mlserve_model_serving_version", model="iris") == 2
    assert value(metrics, "mlserve_models_loaded") == 1
    assert value(metrics, "mlserve_cache_breaker_state") == 2
    assert value(metrics, "mlserve_cache_breaker_transitions_total", state="open") == 1
