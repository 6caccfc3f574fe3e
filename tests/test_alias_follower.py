"""The follower's lease: one holder among the hosts sharing a Redis, renewed
by its holder, taken over when it lapses; and what is followed."""
from __future__ import annotations

import pytest

from app.alias_follower import Lease, follows
from app.mlflow_models import ModelRef
from app.plan import read_plan
from app.repository import ModelRepository
from app.settings import SettingError
from tests.wait import until


@pytest.mark.server
def test_one_host_holds_the_lease_until_it_lapses(redis_server):
    a = Lease(redis_server.url, "host-a", ttl=1.0)
    b = Lease(redis_server.url, "host-b", ttl=1.0)
    assert a.hold() and not b.hold()
    assert a.hold() and not b.hold()  # renewed by its holder
    a.release()
    assert b.hold() and not a.hold()
    # A holder that stops renewing (a host that died) loses it when it lapses.
    until(a.hold, timeout=10, what="the lease lapses and another host takes it")
    assert not b.hold()


def test_without_redis_the_host_is_alone_and_holds_it():
    assert Lease("", "host", ttl=1.0).hold()


def test_a_configured_redis_that_is_down_lets_no_host_fetch():
    assert not Lease("redis://127.0.0.1:1/0", "host", ttl=1.0, connect_timeout=0.1).hold()


def test_what_is_followed_comes_from_models_yaml_and_serving_json(tmp_path):
    repository = ModelRepository(tmp_path / "models")
    (tmp_path / "models" / "churn").mkdir(parents=True)
    repository.record("churn", "follow", None, "test", "", {"follow": {"uri": "models:/churn@prod", "seen": 3}})
    config = tmp_path / "models.yaml"
    config.write_text("models:\n  fraud: {follow: 'models:/fraud@champion'}\n  churn: {}\n")
    found = {f.name: f for f in follows(repository, read_plan(config))}
    assert found["fraud"].ref == ModelRef("fraud", None, "champion") and found["fraud"].pinned
    assert found["churn"].ref == ModelRef("churn", None, "prod") and not found["churn"].pinned
    config.write_text("models:\n  fraud: {}\n")  # churn no longer served: not followed either
    assert [f.name for f in follows(repository, read_plan(config))] == []


@pytest.mark.parametrize("entry, message", [
    ("{follow: 'models:/fraud/3'}", "expected models:/NAME@ALIAS"),
    ("{follow: 'fraud'}", "is not models:/NAME/VERSION or models:/NAME@ALIAS"),
    ("{follow: 'models:/fraud@champion', version: 2}", "follow and version cannot both be set"),
])
def test_bad_follow_entries_stop_start_up_with_one_line(tmp_path, entry, message):
    config = tmp_path / "models.yaml"
    config.write_text(f"models:\n  fraud: {entry}\n")
    with pytest.raises(SettingError, match=message):
        read_plan(config)
