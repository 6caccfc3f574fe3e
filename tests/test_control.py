"""The control channel and reload fan-out: messages reach every listening
worker through Redis; bad messages and failing handlers never kill the
listener; each reload is acted on once per host."""
from __future__ import annotations

import orjson
import pytest

from app.control import ControlChannel
from app.reload import ReloadTrigger, reload_message
from tests.wait import until


def test_messages_go_to_the_handler_of_their_op():
    channel, seen = ControlChannel(""), []
    channel.on("invalidate", seen.append)
    channel.dispatch(orjson.dumps({"op": "invalidate", "model": "iris"}))
    assert seen == [{"op": "invalidate", "model": "iris"}]


@pytest.mark.parametrize("data", [b"not json", b'{"no": "op"}', b'{"op": "unknown"}', b"[1, 2]", 42])
def test_bad_messages_are_ignored(data, caplog):
    channel, seen = ControlChannel(""), []
    channel.on("invalidate", seen.append)
    channel.dispatch(data)
    assert seen == [] and "ignored control message" in caplog.text


def test_a_failing_handler_is_logged_not_raised(caplog):
    channel = ControlChannel("")
    channel.on("reload", lambda message: 1 / 0)
    channel.dispatch(orjson.dumps({"op": "reload"}))
    assert "control message reload failed" in caplog.text


def test_without_redis_nothing_is_sent():
    assert ControlChannel("").publish({"op": "reload"}) is None


def test_an_unreachable_redis_is_none_not_an_error():
    assert ControlChannel("redis://127.0.0.1:1/0", connect_timeout=0.1).publish({"op": "reload"}) is None


@pytest.mark.server
def test_a_published_message_reaches_a_listening_worker(redis_server):
    channel, seen = ControlChannel(redis_server.url), []
    channel.on("invalidate", seen.append)
    channel.start()
    until(channel.subscribed.is_set, what="subscribed")
    assert ControlChannel(redis_server.url).publish({"op": "invalidate", "model": None}) == 1
    until(lambda: seen, what="the message arrives")
    assert seen == [{"op": "invalidate", "model": None}]


def test_a_reload_message_is_acted_on_once_per_host(tmp_path):
    signals = []
    # Two workers of one host share the claims directory their master made.
    workers = [ReloadTrigger(ControlChannel(""), "host-a", tmp_path / "claims", lambda: signals.append("a"))
               for _ in range(2)]
    other_host = ReloadTrigger(ControlChannel(""), "host-b", tmp_path / "claims-b", lambda: signals.append("b"))
    message = reload_message("host-c", "promote iris")
    for trigger in (*workers, other_host):
        trigger.on_message(message)
    assert sorted(signals) == ["a", "b"]


def test_a_host_ignores_its_own_reload_and_odd_ids(tmp_path):
    signals = []
    trigger = ReloadTrigger(ControlChannel(""), "host-a", tmp_path, lambda: signals.append(1))
    trigger.on_message(reload_message("host-a", "mine"))
    trigger.on_message({"op": "reload", "origin": "cli", "id": "../../etc/passwd"})
    assert signals == [] and list(tmp_path.iterdir()) == []


def test_a_request_signals_this_host_and_reports_other_hosts(tmp_path):
    signals = []
    trigger = ReloadTrigger(ControlChannel(""), "host-a", tmp_path, lambda: signals.append(1))
    assert trigger.request("promote iris") == {"this_host": "reloading", "other_hosts_notified": None}
    assert signals == [1]
