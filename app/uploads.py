"""Artifacts uploaded over HTTP, staged on disk until they are published.

An upload is written in parts of at most PART_BYTES, each appended at the
offset the client says it has reached, so no request body is larger than the
server's HTTP body cap however large the model. Uploads live in the model
repository (<repository>/.uploads/<id>/), so hosts sharing the repository
share them: a part may reach any host behind the load balancer. Uploads left
unpublished are removed after STALE_SECONDS.

Only ONNX and skops artifacts are accepted: a pickle is never loaded from the
network.
"""
from __future__ import annotations

import fcntl
import os
import re
import shutil
import time
import uuid
from pathlib import Path
from typing import BinaryIO

from app.errors import BodyTooLarge, Conflict, InvalidField, NotFound
from app.repository import storage

PART_BYTES = 8 << 20
CHUNK = 1 << 20
STALE_SECONDS = 3600
FORMATS = {"onnx": "model.onnx", "skops": "model.skops"}
ID_RE = re.compile(r"[0-9a-f]{32}")
DATA = "data"


class UploadStore:
    def __init__(self, repository_root: Path, max_bytes: int):
        self.root = Path(repository_root) / ".uploads"
        self.max_bytes = max_bytes

    def create(self) -> str:
        """A new, empty upload; its id."""
        self.sweep()
        upload_id = uuid.uuid4().hex
        folder = self.root / upload_id
        with storage("a new upload"):
            folder.mkdir(parents=True)
            (folder / DATA).touch()
        return upload_id

    def append(self, upload_id: str, offset: int, stream: BinaryIO, length: int | None) -> int:
        """Append one part, read from stream (length bytes, or until it ends
        when None), at offset, which must be the upload's size so far; the new size."""
        path = self.data(upload_id)
        if length is not None and length > PART_BYTES:
            raise BodyTooLarge(f"a part is at most {PART_BYTES} bytes; this one is {length}")
        with open(path, "r+b") as f:
            fcntl.flock(f, fcntl.LOCK_EX)  # two parts for one upload never interleave
            size = f.seek(0, os.SEEK_END)
            if offset != size:
                raise Conflict(f"upload {upload_id} has {size} bytes; a part at offset {offset} does not follow on",
                               offset=size)
            try:
                with storage(f"the part at offset {offset} of upload {upload_id}"):
                    return size + self.write_part(f, size, stream, length)
            except BaseException:
                f.truncate(size)  # a part is whole or absent: the client resends it from the same offset
                raise

    def write_part(self, f: BinaryIO, size: int, stream: BinaryIO, length: int | None) -> int:
        written = 0
        while length is None or written < length:
            chunk = stream.read(min(CHUNK, (length - written) if length is not None else CHUNK))
            if not chunk:
                break
            written += len(chunk)
            if written > PART_BYTES or size + written > self.max_bytes:
                limit = PART_BYTES if written > PART_BYTES else self.max_bytes
                raise BodyTooLarge(f"over the limit of {limit} bytes "
                                   f"({'a part' if limit == PART_BYTES else 'models.max_upload_bytes'})")
            f.write(chunk)
        f.flush()  # a full disk shows here, inside the part, not at close
        return written

    def artifact(self, upload_id: str, form: str) -> Path:
        """The whole upload as the artifact of its format (model.onnx or model.skops)."""
        if form not in FORMATS:
            raise InvalidField(f"format must be onnx or skops, got {str(form)[:40]!r}: a pickle is never loaded "
                               "from the network")
        data = self.data(upload_id)
        if data.stat().st_size == 0:
            raise InvalidField(f"upload {upload_id} is empty")
        named = data.with_name(FORMATS[form])
        named.unlink(missing_ok=True)
        os.link(data, named)
        return named

    def remove(self, upload_id: str) -> None:
        shutil.rmtree(self.folder(upload_id), ignore_errors=True)

    def data(self, upload_id: str) -> Path:
        path = self.folder(upload_id) / DATA
        if not path.is_file():
            raise NotFound(f"no upload {upload_id[:40]!r} (unknown, published, or removed after "
                           f"{STALE_SECONDS // 60} minutes)")
        return path

    def folder(self, upload_id) -> Path:
        if not isinstance(upload_id, str) or not ID_RE.fullmatch(upload_id):
            raise NotFound(f"no upload {str(upload_id)[:40]!r}: ids are 32 hex digits")
        return self.root / upload_id

    def sweep(self) -> None:
        """Remove uploads nobody has touched for STALE_SECONDS."""
        if not self.root.is_dir():
            return
        cutoff = time.time() - STALE_SECONDS
        for folder in self.root.iterdir():
            try:
                if ID_RE.fullmatch(folder.name) and (folder / DATA).stat().st_mtime < cutoff:
                    shutil.rmtree(folder, ignore_errors=True)
            except OSError:  # removed meanwhile
                continue
