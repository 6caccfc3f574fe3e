"""API keys on their own: issued once and stored as hashes only, found by id,
compared in constant time, revoked without a restart, and a broken keys file
that never locks every client out."""
from __future__ import annotations

import json
import multiprocessing
import stat

import pytest

from app.errors import Conflict, InvalidField, NotFound
from app.keys import POLL_SECONDS, KeyFile, KeyStore


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def keys(tmp_path) -> KeyFile:
    return KeyFile(tmp_path / "models" / ".api-keys.json")


def test_a_key_is_shown_once_and_stored_only_as_its_hash(keys):
    key, record = keys.create("checkout", ["predict"], ["iris_classifier"], 50)
    assert key.startswith(f"mls_{record['id']}_") and len(key) == 4 + 12 + 1 + 43
    stored = keys.path.read_text()
    assert key not in stored and key.rsplit("_", 1)[1] not in stored
    assert "sha256" not in record and "key" not in record
    assert record == {"id": record["id"], "name": "checkout", "scopes": ["predict"], "models": ["iris_classifier"],
                      "rate": 50, "created": record["created"], "revoked": None}
    assert stat.S_IMODE(keys.path.stat().st_mode) == 0o600
    assert keys.listing() == [record]


def test_the_store_finds_the_principal_of_a_valid_key_only(keys):
    key, record = keys.create("reports", ["read", "predict"])
    store = KeyStore(keys.path)
    principal = store.authenticate(key)
    assert principal.id == record["id"] and principal.name == "reports"
    assert principal.allows("read") and principal.allows("predict") and not principal.allows("admin")
    assert principal.allows_model("anything") and principal.rate is None
    tampered = key[:-1] + ("A" if key[-1] != "A" else "B")
    assert store.authenticate(tampered) is None
    assert store.authenticate("mls_000000000000_" + "x" * 43) is None
    assert store.authenticate("not a key at all") is None and store.authenticate("") is None


def test_admin_implies_every_scope_and_models_limit_a_key(keys):
    admin_key, _ = keys.create("ops", ["admin"])
    limited_key, _ = keys.create("web", ["predict"], ["iris_classifier", "wine_clusters"])
    store = KeyStore(keys.path)
    assert all(store.authenticate(admin_key).allows(s) for s in ("predict", "read", "admin"))
    limited = store.authenticate(limited_key)
    assert limited.allows_model("wine_clusters") and not limited.allows_model("diabetes_regressor")


def test_a_revoked_key_stops_working_at_the_next_look_at_the_file(keys):
    clock = Clock()
    key, record = keys.create("batch-job", ["predict"])
    store = KeyStore(keys.path, clock)
    assert store.authenticate(key) is not None
    revoked = keys.revoke("batch-job")
    assert revoked["revoked"] and revoked["id"] == record["id"]
    assert "sha256" not in json.loads(keys.path.read_text())["keys"][0]  # nothing left to match
    clock.now += POLL_SECONDS / 2
    assert store.authenticate(key) is not None  # not looked at yet: within the poll interval
    clock.now += POLL_SECONDS
    assert store.authenticate(key) is None
    with pytest.raises(NotFound):
        keys.revoke(record["id"])  # already revoked


def test_a_forced_refresh_sees_a_change_at_once(keys):
    clock = Clock()
    store = KeyStore(keys.path, clock)
    store.refresh()  # before the key exists
    key, _ = keys.create("new", ["read"])
    assert store.authenticate(key) is None  # within the poll interval: not looked at again
    store.refresh(force=True)
    assert store.authenticate(key) is not None


def test_names_are_unique_among_active_keys_and_reusable_after_revoke(keys):
    keys.create("app", ["predict"])
    with pytest.raises(Conflict, match="a key named 'app' exists"):
        keys.create("app", ["read"])
    keys.revoke("app")
    keys.create("app", ["read"])
    assert [(r["name"], bool(r["revoked"])) for r in keys.listing()] == [("app", True), ("app", False)]


@pytest.mark.parametrize("name, scopes, models, rate, message", [
    ("", ["predict"], None, None, "name"),
    ("a/b", ["predict"], None, None, "name"),
    ("x" * 65, ["predict"], None, None, "name"),
    ("ok", [], None, None, "scopes"),
    ("ok", ["write"], None, None, "scopes"),
    ("ok", "predict", None, None, "scopes"),
    ("ok", ["predict"], [], None, "models"),
    ("ok", ["predict"], ["../etc"], None, "models"),
    ("ok", ["predict"], None, 0, "rate"),
    ("ok", ["predict"], None, 1.5, "rate"),
])
def test_bad_key_requests_are_refused_with_the_field(keys, name, scopes, models, rate, message):
    with pytest.raises(InvalidField, match=message):
        keys.create(name, scopes, models, rate)
    assert not keys.path.exists()


def test_a_broken_file_keeps_the_keys_read_before(keys, caplog):
    clock = Clock()
    key, _ = keys.create("steady", ["predict"])
    store = KeyStore(keys.path, clock)
    assert store.authenticate(key) is not None
    keys.path.write_text('{"keys": [')  # a hand edit gone wrong
    clock.now += POLL_SECONDS * 2
    assert store.authenticate(key) is not None
    assert "not read, the keys read before stay in force" in caplog.text
    assert key not in caplog.text


def create_many(path: str, prefix: str) -> None:
    keys = KeyFile(path)
    for i in range(10):
        keys.create(f"{prefix}-{i}", ["predict"])


def test_concurrent_writers_lose_no_key(keys):
    keys.path.parent.mkdir(parents=True)
    workers = [multiprocessing.get_context("fork").Process(target=create_many, args=(str(keys.path), p))
               for p in "abcd"]
    for w in workers:
        w.start()
    for w in workers:
        w.join(30)
    assert sorted(r["name"] for r in keys.listing()) == sorted(f"{p}-{i}" for p in "abcd" for i in range(10))
