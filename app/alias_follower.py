"""Following an MLflow alias: when models:/NAME@ALIAS moves to another
version, that version is fetched, checked and published here like any
publish, then promoted through the lifecycle's checked swap.

What a model follows is recorded in its serving.json (`mlserve models
follow`) or pinned in config/models.yaml (`follow: models:/NAME@ALIAS`).
serving.json also records the MLflow version last acted on (`seen`), so the
follower acts only when the alias moves, whichever host acted last: a local
rollback is left alone until the alias moves again, and a version that was
refused is not fetched again.

One host per Redis does the fetching (a Lease); the others receive the
reload like any other change.
"""
from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Callable

import redis

from app.errors import Conflict, InvalidData, ModelNotFound, ModelRefused, VersionNotFound
from app.lifecycle import Lifecycle
from app.mlflow_models import MLflowRegistry, ModelRef, RegisteredVersion, parse_model_uri, publish_registered
from app.plan import ServingPlan
from app.redis_client import connect
from app.repository import SERVING, ModelRepository, is_valid_name

log = logging.getLogger(__name__)
LEASE_KEY = "mlserve:alias-follower"


@dataclass(frozen=True)
class Follow:
    name: str          # the model here
    ref: ModelRef      # the MLflow alias it follows
    pinned: bool = False  # set in models.yaml, not serving.json


@dataclass(frozen=True)
class Outcome:
    """What one check of a followed alias did."""
    follow: Follow
    result: str        # "unchanged", "promoted", "refused" or "failed" (no answer from MLflow)
    detail: str
    mlflow_version: int | None = None
    version: int | None = None   # the version here that serves it

    @property
    def changed(self) -> bool:
        return self.result == "promoted"


def follows(repository: ModelRepository, plan: ServingPlan) -> list[Follow]:
    """Every alias followed: models.yaml's pins, then what serving.json files record."""
    found = {name: Follow(name, parse_model_uri(p.follow), True)
             for name, p in (plan.listed or {}).items() if p.follow}
    root = repository.root
    folders = sorted(p.name for p in root.iterdir() if p.is_dir() and is_valid_name(p.name)) if root.is_dir() else []
    for name in folders:
        if name in found or not (root / name / SERVING).is_file():
            continue
        try:
            uri = (repository.serving_state(name) or {}).get("follow", {}) or {}
            if uri.get("uri") and (plan.listed is None or name in plan.listed):
                found[name] = Follow(name, parse_model_uri(uri["uri"]))
        except Exception as exc:  # one unreadable file must not stop the others
            log.error("%s: cannot read what it follows: %s", name, getattr(exc, "message", exc))
    return list(found.values())


class AliasFollower:
    """Checks followed aliases and rolls their moves out through the lifecycle."""

    def __init__(self, publisher, lifecycle: Lifecycle, registry: Callable[[], MLflowRegistry],
                 by: str = "mlflow-follower"):
        self.publisher = publisher
        self.lifecycle = lifecycle
        self.repository = lifecycle.repository
        self.registry = registry  # made on first use: the MLflow client is imported only when something is followed
        self.by = by

    def follows(self) -> list[Follow]:
        return follows(self.repository, self.lifecycle.read_plan())

    def check(self, follow: Follow, progress=None) -> Outcome:
        """Resolve the alias; if it moved since it was last seen, publish and
        promote the version it points at. Never raises for what MLflow or the
        version does: the outcome says."""
        try:
            found = self.registry().resolve(follow.ref)
        except (InvalidData, ModelRefused) as exc:
            return Outcome(follow, "failed", exc.message)
        seen = self.seen(follow)
        if found.version == seen.get("seen"):
            return Outcome(follow, "unchanged", f"{follow.ref} is still v{found.version}", found.version,
                           self.lifecycle.current(follow.name))
        try:
            version = self.roll_out(follow, found, progress)
        except (ModelRefused, Conflict, InvalidData, ModelNotFound, VersionNotFound) as exc:
            reason = f"{follow.ref} moved to v{found.version}, refused: {exc.message}"
            self.remember(follow, found, reason, refused=True)
            return Outcome(follow, "refused", reason, found.version)
        detail = f"{follow.ref} is v{found.version}: {follow.name} v{version} serving"
        self.remember(follow, found, detail)
        return Outcome(follow, "promoted", detail, found.version, version)

    def roll_out(self, follow: Follow, found: RegisteredVersion, progress=None) -> int:
        """The version here holding found (published now unless one already
        does), promoted unless it already serves."""
        version = self.local_version(follow.name, found)
        reason = f"{follow.ref} moved to v{found.version}"
        if version is None:
            mv, _ = publish_registered(self.publisher, self.registry(), follow.ref, follow.name, progress,
                                       by=self.by, reason=reason, found=found)
            version = mv.version
        if self.lifecycle.current(follow.name) != version:
            self.lifecycle.promote(follow.name, version, by=self.by, reason=reason)
        return version

    def local_version(self, name: str, found: RegisteredVersion) -> int | None:
        """The newest version here published from the same MLflow version (a move back to it)."""
        if not is_valid_name(name):
            return None
        for version in reversed(self.repository.versions(name)):
            try:
                mlflow = self.repository.get(name, version).metadata.get("mlflow") or {}
            except Exception:  # an unreadable version is no match
                continue
            if mlflow.get("registered_model") == found.ref.name and mlflow.get("registered_version") == found.version:
                return version
        return None

    def seen(self, follow: Follow) -> dict:
        state = self.repository.serving_state(follow.name) if (self.repository.root / follow.name).is_dir() else None
        recorded = (state or {}).get("follow") or {}
        # What was seen counts only for the alias followed now.
        return recorded if recorded.get("uri") == str(follow.ref) else {}

    def remember(self, follow: Follow, found: RegisteredVersion, reason: str, refused: bool = False) -> None:
        (self.repository.root / follow.name).mkdir(parents=True, exist_ok=True)
        record = {"uri": str(follow.ref), "seen": found.version, "refused": reason if refused else None}
        self.repository.record(follow.name, "follow", None, self.by, reason, {"follow": record})

    def stop_following(self, name: str, by: str = "", reason: str = "") -> None:
        self.lifecycle.allow(name, "follow")
        if not (self.repository.serving_state(name) or {}).get("follow"):
            raise ModelNotFound(f"{name} follows no MLflow alias")
        self.repository.record(name, "unfollow", None, by, reason, {"follow": None})


class Lease:
    """One holder at a time among the hosts sharing a Redis: a lock with a
    time to live that its holder renews on every poll. Without Redis the host
    is alone and always holds it."""

    def __init__(self, url: str, holder: str, ttl: float, connect_timeout: float = 0.5):
        self.url = url
        self.holder = holder
        self.ttl = ttl
        self.connect_timeout = connect_timeout
        self.lock: redis.lock.Lock | None = None

    def hold(self) -> bool:
        """True while this process holds the lease (taking it when it is free)."""
        if not self.url:
            return True
        try:
            if self.lock is None:
                client = connect(self.url, self.connect_timeout, self.connect_timeout)
                self.lock = client.lock(LEASE_KEY, timeout=self.ttl, blocking=False, thread_local=False)
            if self.lock.owned():
                return bool(self.lock.reacquire())
            return bool(self.lock.acquire(blocking=False, token=self.holder))
        except redis.RedisError as exc:
            # Without Redis no host can be sure it is the only one fetching: none does.
            log.warning("Redis unavailable, not checking the followed aliases (%s)", exc)
            return False

    def release(self) -> None:
        try:
            if self.lock is not None and self.lock.owned():
                self.lock.release()
        except redis.RedisError:
            pass


class FollowLoop:
    """The follower process's loop: every interval, if this host holds the
    lease, check every followed alias; after any roll-out, one reload."""

    def __init__(self, follower: AliasFollower, lease: Lease, reload: Callable[[str], object],
                 counted: Callable[[str, str], None], interval: float):
        self.follower = follower
        self.lease = lease
        self.reload = reload
        self.counted = counted
        self.interval = interval
        self.stop = threading.Event()

    def run(self) -> None:
        while True:
            try:
                self.poll()
            except Exception:  # the loop outlives any one bad poll
                log.exception("checking the followed aliases failed")
            if self.stop.wait(self.interval):
                break
        self.lease.release()

    def poll(self) -> list[Outcome]:
        followed = self.follower.follows()
        if not followed or not self.lease.hold():
            return []
        outcomes = []
        for follow in followed:
            if not self.lease.hold():  # a long roll-out may have outlived the lease
                break
            outcome = self.follower.check(follow)
            outcomes.append(outcome)
            self.report(outcome)
        changed = [o for o in outcomes if o.changed]
        if changed:
            self.reload("; ".join(o.detail for o in changed))
        return outcomes

    def report(self, outcome: Outcome) -> None:
        if outcome.result == "unchanged":
            return
        if outcome.result == "promoted":
            log.info("%s", outcome.detail)
        elif outcome.result == "refused":
            log.error("%s; %s keeps serving v%s", outcome.detail, outcome.follow.name,
                      self.follower.lifecycle.current(outcome.follow.name))
        else:
            log.warning("%s: %s", outcome.follow.ref, outcome.detail)
        # Counted once the log says why, so whoever sees the count finds the reason.
        self.counted(outcome.follow.name, outcome.result)
