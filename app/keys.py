"""API keys: shown once when issued, kept only as hashes, checked in constant time.

A key reads mls_<id>_<secret>. The id is public (listings and logs name a key
by it) and finds the key's record; the SHA-256 of the whole key is compared
with hmac.compare_digest. The secret is 256 random bits, so one fast hash is
enough: slow hashes protect guessable passwords, at a cost on every request.

The keys file (JSON, mode 0600) is the one source of truth. KeyFile changes it
under a lock, from the CLI or the admin API; every worker's KeyStore re-reads
it when it changes, looked at no more than every POLL_SECONDS (and at once when
the control channel says so), so a revoked key stops working on every worker
within a second.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import hmac
import logging
import os
import re
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import orjson

from app.clock import utc_now
from app.errors import Conflict, InvalidField, NotFound
from app.repository import is_valid_name

log = logging.getLogger(__name__)
SCOPES = ("predict", "read", "admin")
PREFIX = "mls_"
POLL_SECONDS = 0.5
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}")
ID_RE = re.compile(r"[0-9a-f]{12}")
KEY_RE = re.compile(PREFIX + r"([0-9a-f]{12})_[A-Za-z0-9_-]{43}")
# Compared against when the id is unknown, so a miss costs what a hit costs.
NO_HASH = hashlib.sha256(b"no such key").hexdigest()


@dataclass(frozen=True)
class Principal:
    """Who a request comes from: a key, or the server's admin token."""
    id: str
    name: str
    scopes: frozenset[str]
    models: frozenset[str] | None = None  # None: every model
    rate: int | None = None  # its own requests per second; None: the server's limit

    def allows(self, scope: str) -> bool:
        return "admin" in self.scopes or scope in self.scopes

    def allows_model(self, name: str) -> bool:
        return self.models is None or name in self.models


ADMIN_TOKEN = Principal("admin-token", "the admin token", frozenset({"admin"}))


def digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def new_key() -> tuple[str, str]:
    """(id, key) of a fresh key."""
    key_id = secrets.token_hex(6)
    return key_id, f"{PREFIX}{key_id}_{secrets.token_urlsafe(32)}"


def principal_of(record: dict) -> Principal:
    models = record.get("models")
    return Principal(record["id"], record["name"], frozenset(record["scopes"]),
                     None if models is None else frozenset(models), record.get("rate"))


def check_request(name, scopes, models, rate) -> None:
    """InvalidField unless these can make a key."""
    if type(name) is not str or not NAME_RE.fullmatch(name):
        raise InvalidField("a key's name is 1 to 64 letters, digits or _.@- (starting with a letter or digit)")
    if not isinstance(scopes, list) or not scopes or any(s not in SCOPES for s in scopes):
        raise InvalidField(f"scopes must be a non-empty list of: {', '.join(SCOPES)}")
    if models is not None and (not isinstance(models, list) or not models
                               or any(not is_valid_name(m) for m in models)):
        raise InvalidField("models must be a non-empty list of model names (or absent: every model)")
    if rate is not None and (type(rate) is not int or not 1 <= rate <= 10_000_000):
        raise InvalidField("rate must be a whole number of requests per second from 1 to 10000000")


class KeyFile:
    """The keys file, changed under an exclusive lock and replaced atomically."""

    def __init__(self, path: Path, clock: Callable[[], str] = utc_now):
        self.path = Path(path)
        self.clock = clock

    def listing(self) -> list[dict]:
        """Every key ever issued, revoked ones too, without their hashes."""
        return [public(r) for r in read_records(self.path)]

    def create(self, name: str, scopes: list[str], models: list[str] | None = None,
               rate: int | None = None) -> tuple[str, dict]:
        """(key, record) of a new key; the key itself is stored nowhere."""
        check_request(name, scopes, models, rate)
        with self.changing() as records:
            if any(r["name"] == name and not r.get("revoked") for r in records):
                raise Conflict(f"a key named {name!r} exists; revoke it first or choose another name")
            key_id, key = new_key()
            record = {"id": key_id, "name": name, "scopes": sorted(set(scopes), key=SCOPES.index),
                      "models": sorted(set(models)) if models else None, "rate": rate,
                      "created": self.clock(), "revoked": None, "sha256": digest(key)}
            records.append(record)
        return key, public(record)

    def revoke(self, name_or_id: str) -> dict:
        """Revoke the active key with this id or name; its record, without the hash."""
        with self.changing() as records:
            for record in records:
                if not record.get("revoked") and name_or_id in (record["id"], record["name"]):
                    record["revoked"] = self.clock()
                    record.pop("sha256", None)  # of no use once revoked
                    return public(record)
        raise NotFound(f"no active key with the id or name {name_or_id!r}")

    @contextlib.contextmanager
    def changing(self) -> Iterator[list[dict]]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_name(self.path.name + ".lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # two writers never lose each other's change
            records = read_records(self.path)
            yield records
            write_records(self.path, records)


def public(record: dict) -> dict:
    return {k: v for k, v in record.items() if k != "sha256"}


def read_records(path: Path) -> list[dict]:
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return []
    data = orjson.loads(raw)
    if not isinstance(data, dict) or not isinstance(data.get("keys"), list):
        raise ValueError(f"{path} is not a keys file (expected {{\"keys\": [...]}})")
    return data["keys"]


def write_records(path: Path, records: Iterable[dict]) -> None:
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(orjson.dumps({"keys": list(records)}, option=orjson.OPT_INDENT_2))
        f.flush()
        os.fsync(f.fileno())
    os.replace(partial, path)


class KeyStore:
    """One worker's view of the keys file: who a presented key belongs to."""

    def __init__(self, path: Path, clock: Callable[[], float] = time.monotonic):
        self.path = Path(path)
        self.clock = clock
        self.by_id: dict[str, tuple[str, Principal]] = {}
        self.seen: tuple | None = None
        self.checked = float("-inf")

    def authenticate(self, key: str) -> Principal | None:
        self.refresh()
        match = KEY_RE.fullmatch(key)
        found = self.by_id.get(match.group(1)) if match else None
        expected, principal = found or (NO_HASH, None)
        return principal if hmac.compare_digest(digest(key), expected) and found else None

    def refresh(self, force: bool = False) -> None:
        """Re-read the file if it changed; looked at once per POLL_SECONDS unless forced."""
        now = self.clock()
        if not force and now - self.checked < POLL_SECONDS:
            return
        self.checked = now
        try:
            st = os.stat(self.path)
            seen = (st.st_ino, st.st_mtime_ns, st.st_size)
        except FileNotFoundError:
            seen = None
        if seen == self.seen and not force:
            return
        try:
            records = read_records(self.path)
            by_id = {r["id"]: (r["sha256"], principal_of(r)) for r in records
                     if not r.get("revoked") and r.get("sha256")}
        except (OSError, ValueError, KeyError, TypeError) as exc:
            # Keep the keys last read: a half-edited file must not lock every client out.
            log.error("API keys file %s not read, the keys read before stay in force: %s", self.path, exc)
            return
        self.seen, self.by_id = seen, by_id
