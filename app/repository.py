"""The model repository on disk: <root>/<name>/<version>/{artifact, metadata.json}.

What is on disk, not what is loaded (that is the registry). Every name or
version that could become a path is validated here first.
"""
from __future__ import annotations

import errno
import fcntl
import getpass
import hashlib
import json
import os
import re
import shutil
import socket
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from app.clock import utc_now
from app.errors import InsufficientStorage, InvalidModel, ModelNotFound, VersionNotFound

NAME_RE = re.compile(r"[a-z0-9][a-z0-9_-]{0,63}")
VERSION_RE = re.compile(r"[1-9][0-9]{0,17}")
ARTIFACTS = ("model.onnx", "model.skops", "model.joblib", "model.pkl")
SOURCE_FORMATS = {"model.onnx": "onnx", "model.skops": "skops", "model.joblib": "joblib", "model.pkl": "pickle"}
METADATA = "metadata.json"
SERVING = "serving.json"


def is_valid_name(name: Any) -> bool:
    return isinstance(name, str) and NAME_RE.fullmatch(name) is not None


def check_name(name: Any) -> str:
    if not is_valid_name(name):
        raise ModelNotFound(f"no model named {str(name)[:80]!r}: names match [a-z0-9][a-z0-9_-]{{0,63}}")
    return name


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass(frozen=True)
class ModelVersion:
    """One version directory and its metadata."""
    name: str
    version: int
    path: Path
    metadata: dict

    @property
    def artifact(self) -> Path:
        return self.path / self.metadata["artifact"]

    def checked_file(self, filename: str, sha_key: str) -> Path:
        """Path of filename, refused unless its sha256 matches metadata[sha_key]."""
        path = self.path / filename
        expected = self.metadata.get(sha_key)
        if not expected:
            raise InvalidModel(f"{self}: metadata has no {sha_key}")
        actual = sha256_of(path)
        if actual != expected:
            raise InvalidModel(f"{self}: sha256 of {filename} is {actual[:12]}..., metadata says {expected[:12]}...")
        return path

    def __str__(self) -> str:
        return f"{self.name} v{self.version}"


class ModelRepository:
    def __init__(self, root: Path | str):
        self.root = Path(root)

    def names(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir()
                      if p.is_dir() and is_valid_name(p.name) and self.versions(p.name))

    def versions(self, name: str) -> list[int]:
        folder = self.root / check_name(name)
        if not folder.is_dir():
            return []
        return sorted(int(p.name) for p in folder.iterdir()
                      if p.is_dir() and VERSION_RE.fullmatch(p.name) and (p / METADATA).is_file())

    def latest(self, name: str) -> int:
        versions = self.versions(name)
        if not versions:
            raise ModelNotFound(f"no model named {name!r} in the repository")
        return versions[-1]

    def get(self, name: str, version: int) -> ModelVersion:
        if version not in self.versions(name):
            raise VersionNotFound(f"{name} has no version {version}")
        path = self.root / name / str(version)
        try:
            metadata = json.loads((path / METADATA).read_text())
        except (OSError, ValueError) as exc:
            raise InvalidModel(f"{name} v{version}: unreadable {METADATA} ({exc})") from None
        if not isinstance(metadata, dict):
            raise InvalidModel(f"{name} v{version}: {METADATA} is not an object")
        metadata.setdefault("artifact", find_artifact(path))
        if metadata["artifact"] not in ARTIFACTS:
            raise InvalidModel(f"{name} v{version}: artifact must be one of {', '.join(ARTIFACTS)}")
        return ModelVersion(name, version, path, metadata)

    def add_version(self, name: str, files: dict[str, Path], metadata: dict,
                    check: Callable[[ModelVersion], dict | None] | None = None,
                    by: str = "", reason: str = "") -> ModelVersion:
        """Copy files into the next version directory with metadata; atomic by
        rename, after check (if given) accepted the staged version; what check
        returns (a dict) is added to the metadata. The first version of a model
        becomes its serving version. Publishes of one model at once each get
        their own version; a full disk refuses the publish and leaves nothing."""
        check_name(name)
        folder = self.root / name
        with storage(f"publishing {name}"):
            folder.mkdir(parents=True, exist_ok=True)
            staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=folder))
            try:
                staging.chmod(0o755)
                for filename, source in files.items():
                    shutil.copyfile(source, staging / filename)
                metadata = {**metadata, "name": name, "version": self.next_version(name)}
                write_json(staging / METADATA, metadata)
                if check is not None:
                    found = check(ModelVersion(name, metadata["version"], staging,
                                               {"artifact": find_artifact(staging), **metadata}))
                    metadata.update(found or {})  # what only the staged version could tell (its measured cost)
                version = self.commit(folder, staging, metadata)
            except BaseException:
                shutil.rmtree(staging, ignore_errors=True)
                raise
        try:
            self.record_publish(name, version, by, reason)  # record() names a full disk itself
        except BaseException:
            shutil.rmtree(folder / str(version), ignore_errors=True)  # a version without its history entry
            raise
        return self.get(name, version)

    def commit(self, folder: Path, staging: Path, metadata: dict) -> int:
        """Rename staging to the next free version number, taken under the
        model's lock so two publishes never claim the same one; that number."""
        with locked(folder / ".publish.lock"):
            version = metadata["version"] = self.next_version(folder.name)  # may differ from the one checked with
            write_json(staging / METADATA, metadata)
            os.rename(staging, folder / str(version))
        return version

    def record_publish(self, name: str, version: int, by: str, reason: str) -> None:
        if self.serving_state(name) is None:
            # No serving state yet: what served before (the newest) still does;
            # the first version of a new model serves at once.
            older = [v for v in self.versions(name) if v != version]
            self.record(name, "publish", version, by, reason, {"version": older[-1] if older else version})
        else:
            self.record(name, "publish", version, by, reason, {})

    def serving_state(self, name: str) -> dict | None:
        """The model's serving.json: version, previous, split, shadow, history; None if absent."""
        path = self.root / check_name(name) / SERVING
        try:
            state = json.loads(path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            raise InvalidModel(f"{name}: unreadable {SERVING} ({exc})") from None
        return state if isinstance(state, dict) else None

    def record(self, name: str, action: str, version: int | None, by: str, reason: str, changes: dict) -> dict:
        """Apply changes to serving.json and append who/when/why to its history;
        one writer at a time, so no change is lost to another made at once."""
        path = self.root / name / SERVING
        with storage(f"recording {action} of {name}"), locked(path.with_name(".serving.lock")):
            state = self.serving_state(name) or {"version": None, "previous": None, "split": None,
                                                 "shadow": None, "history": []}
            state.update(changes)
            state["history"].append({"at": utc_now(precise=False),
                                     "by": by or default_actor(), "action": action, "version": version,
                                     "reason": reason or None})
            tmp = path.with_name(f".{SERVING}.{os.getpid()}")
            try:
                tmp.write_text(json.dumps(state, indent=2) + "\n")
                os.replace(tmp, path)  # readers never see half a file
            finally:
                tmp.unlink(missing_ok=True)
        return state

    def next_version(self, name: str) -> int:
        folder = self.root / name
        taken = [int(p.name) for p in folder.iterdir() if VERSION_RE.fullmatch(p.name)] if folder.is_dir() else []
        return max(taken, default=0) + 1


def write_json(path: Path, value: dict) -> None:
    path.write_text(json.dumps(value, indent=2, default=str) + "\n")


@contextmanager
def locked(path: Path):
    """An exclusive lock on path (created if missing) for the with block, across processes."""
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


@contextmanager
def storage(what: str):
    """Turn a full disk or quota into InsufficientStorage naming what was refused."""
    try:
        yield
    except OSError as exc:
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            raise
        raise InsufficientStorage(f"{what} refused: the models directory is out of space "
                                  f"({exc.strerror}); nothing was written") from None


def default_actor() -> str:
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = str(os.getuid())
    return f"{user}@{socket.gethostname()}"


def find_artifact(path: Path) -> str:
    for filename in ARTIFACTS:
        if (path / filename).is_file():
            return filename
    raise InvalidModel(f"{path}: no artifact ({', '.join(ARTIFACTS)})")
