"""The model repository on disk: names, versions, publishing new versions."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from app.errors import InvalidModel, ModelNotFound, VersionNotFound
from app.repository import ModelRepository, check_name, is_valid_name


def make_version(root: Path, name: str, version: str, artifact: str = "model.joblib",
                 metadata: dict | None = None) -> Path:
    folder = root / name / version
    folder.mkdir(parents=True)
    (folder / artifact).write_bytes(b"artifact bytes")
    meta = {"artifact": artifact} if metadata is None else metadata
    (folder / "metadata.json").write_text(json.dumps(meta))
    return folder


@pytest.fixture
def repo(tmp_path) -> ModelRepository:
    return ModelRepository(tmp_path / "models")


@pytest.mark.parametrize("name", ["a", "0", "iris_classifier", "model-2", "a" * 64, "9lives", "a_-_b"])
def test_valid_names(name):
    assert is_valid_name(name)
    assert check_name(name) == name


@pytest.mark.parametrize("name", ["../x", "..", ".", "A", "Iris", "", "a/b", "a\\b", "a" * 65,
                                  "_a", "-a", "a b", "a.b", "a\n", "\na", "a\x00", "é", "/abs"])
def test_invalid_names_are_refused(name, repo):
    assert not is_valid_name(name)
    with pytest.raises(ModelNotFound):
        check_name(name)
    with pytest.raises(ModelNotFound):
        repo.versions(name)
    with pytest.raises(ModelNotFound):
        repo.get(name, 1)
    with pytest.raises(ModelNotFound):
        repo.add_version(name, {}, {})


@pytest.mark.parametrize("name", [None, 1, 1.5, b"abc", ["abc"], {"a": 1}, object()])
def test_non_string_names_are_refused(name):
    assert not is_valid_name(name)
    with pytest.raises(ModelNotFound):
        check_name(name)


def test_invalid_name_never_touches_the_filesystem(tmp_path):
    root = tmp_path / "models"
    root.mkdir()
    outside = tmp_path / "x"
    make_version(tmp_path, "x", "1")
    repo = ModelRepository(root)
    with pytest.raises(ModelNotFound):
        repo.versions("../x")
    with pytest.raises(ModelNotFound):
        repo.add_version("../y", {}, {"task": "classification"})
    assert not (tmp_path / "y").exists()
    assert sorted(p.name for p in outside.iterdir()) == ["1"]


def test_versions_are_positive_integers_only(repo):
    for version in ("1", "2", "10", "0", "01", "abc", "-1", "1.5", " 3", "3 ", "+4"):
        make_version(repo.root, "m", version)
    assert repo.versions("m") == [1, 2, 10]
    assert repo.latest("m") == 10


@pytest.mark.parametrize("odd", ["\u00b2", "\u0661", "\u0663", "\uff11"])
def test_versions_ignore_non_ascii_digit_directories(repo, odd):
    make_version(repo.root, "m", "1")
    make_version(repo.root, "m", odd)
    assert repo.versions("m") == [1]
    assert repo.latest("m") == 1
    assert repo.names() == ["m"]


@pytest.mark.parametrize("odd", ["\u00b2", "\u0663"])
def test_add_version_ignores_non_ascii_digit_directories(repo, tmp_path, odd):
    make_version(repo.root, "m", "1")
    make_version(repo.root, "m", odd)
    mv = repo.add_version("m", source_files(tmp_path), {"artifact": "model.joblib"})
    assert mv.version >= 2
    assert (repo.root / "m" / str(mv.version) / "model.joblib").is_file()


def test_version_directory_without_metadata_is_not_a_version(repo):
    make_version(repo.root, "m", "1")
    (repo.root / "m" / "2").mkdir()
    (repo.root / "m" / "2" / "model.joblib").write_bytes(b"half written")
    assert repo.versions("m") == [1]
    with pytest.raises(VersionNotFound):
        repo.get("m", 2)


def test_versions_sorted_numerically(repo):
    for version in ("9", "10", "2", "100"):
        make_version(repo.root, "m", version)
    assert repo.versions("m") == [2, 9, 10, 100]
    assert repo.latest("m") == 100


def test_versions_of_unknown_model_is_empty(repo):
    assert repo.versions("nothing") == []
    with pytest.raises(ModelNotFound):
        repo.latest("nothing")


def test_names_lists_only_valid_models_with_versions(repo):
    make_version(repo.root, "good", "1")
    make_version(repo.root, "Bad", "1")
    make_version(repo.root, "also_good", "3")
    (repo.root / "empty").mkdir()
    make_version(repo.root, "only_zero", "0")
    (repo.root / "stray.txt").write_text("x")
    assert repo.names() == ["also_good", "good"]


def test_names_of_missing_root_is_empty(tmp_path):
    assert ModelRepository(tmp_path / "nowhere").names() == []


def test_get_returns_version_with_metadata(repo):
    folder = make_version(repo.root, "m", "3", metadata={"artifact": "model.joblib", "task": "regression"})
    mv = repo.get("m", 3)
    assert (mv.name, mv.version) == ("m", 3)
    assert mv.path == folder
    assert mv.metadata["task"] == "regression"
    assert mv.artifact == folder / "model.joblib"
    assert str(mv) == "m v3"


@pytest.mark.parametrize("version", [2, 0, -1, "1", 1.5, None])
def test_get_of_missing_version_is_version_not_found(repo, version):
    make_version(repo.root, "m", "1")
    with pytest.raises(VersionNotFound):
        repo.get("m", version)


def test_get_of_missing_model_is_version_not_found_not_a_crash(repo):
    with pytest.raises((VersionNotFound, ModelNotFound)):
        repo.get("absent", 1)


@pytest.mark.parametrize("artifact", ["model.onnx", "model.joblib", "model.pkl"])
def test_metadata_without_artifact_finds_the_artifact(repo, artifact):
    make_version(repo.root, "m", "1", artifact=artifact, metadata={"task": "classification"})
    mv = repo.get("m", 1)
    assert mv.metadata["artifact"] == artifact
    assert mv.artifact == repo.root / "m" / "1" / artifact


def test_metadata_without_artifact_prefers_onnx(repo):
    folder = make_version(repo.root, "m", "1", artifact="model.joblib", metadata={})
    (folder / "model.onnx").write_bytes(b"graph")
    assert repo.get("m", 1).metadata["artifact"] == "model.onnx"


def test_version_without_any_artifact_is_invalid(repo):
    folder = repo.root / "m" / "1"
    folder.mkdir(parents=True)
    (folder / "metadata.json").write_text(json.dumps({"task": "classification"}))
    with pytest.raises(InvalidModel):
        repo.get("m", 1)


@pytest.mark.parametrize("artifact", ["../../etc/passwd", "/etc/passwd", "model.py", "metadata.json",
                                      "model.onnx/..", "sub/model.onnx", "", 7, None])
def test_artifact_outside_the_allowed_set_is_refused(repo, artifact):
    folder = make_version(repo.root, "m", "1", metadata={"artifact": artifact})
    (folder / "model.py").write_text("print('no')")
    with pytest.raises(InvalidModel, match="artifact"):
        repo.get("m", 1)


@pytest.mark.parametrize("content", ["{not json", "[1, 2]", '"text"', "null", ""])
def test_unreadable_or_non_object_metadata_is_invalid(repo, content):
    folder = make_version(repo.root, "m", "1")
    (folder / "metadata.json").write_text(content)
    with pytest.raises(InvalidModel):
        repo.get("m", 1)


def source_files(tmp_path: Path) -> dict[str, Path]:
    joblib_file = tmp_path / "src.joblib"
    joblib_file.write_bytes(b"estimator")
    onnx_file = tmp_path / "src.onnx"
    onnx_file.write_bytes(b"graph")
    return {"model.joblib": joblib_file, "model.onnx": onnx_file}


def test_add_version_numbers_from_one(repo, tmp_path):
    files = source_files(tmp_path)
    versions = [repo.add_version("m", files, {"artifact": "model.joblib", "n": i}) for i in range(3)]
    assert [mv.version for mv in versions] == [1, 2, 3]
    assert repo.versions("m") == [1, 2, 3]
    assert repo.latest("m") == 3
    mv = repo.get("m", 2)
    assert mv.metadata["n"] == 1
    assert mv.metadata["name"] == "m" and mv.metadata["version"] == 2
    assert (mv.path / "model.joblib").read_bytes() == b"estimator"
    assert (mv.path / "model.onnx").read_bytes() == b"graph"


def test_add_version_metadata_name_and_version_are_the_repository_s(repo, tmp_path):
    mv = repo.add_version("m", source_files(tmp_path), {"artifact": "model.joblib", "name": "other", "version": 99})
    assert (mv.metadata["name"], mv.metadata["version"]) == ("m", 1)
    on_disk = json.loads((mv.path / "metadata.json").read_text())
    assert (on_disk["name"], on_disk["version"]) == ("m", 1)


def test_add_version_continues_after_the_highest_existing(repo, tmp_path):
    make_version(repo.root, "m", "7")
    mv = repo.add_version("m", source_files(tmp_path), {"artifact": "model.joblib"})
    assert mv.version == 8
    assert repo.versions("m") == [7, 8]


def test_add_version_never_reuses_an_existing_directory(repo, tmp_path):
    make_version(repo.root, "m", "1")
    leftover = repo.root / "m" / "2"
    leftover.mkdir()
    (leftover / "notes.txt").write_text("keep me")
    mv = repo.add_version("m", source_files(tmp_path), {"artifact": "model.joblib"})
    assert mv.version not in (1, 2)
    assert (leftover / "notes.txt").read_text() == "keep me"
    assert mv.version in repo.versions("m")


def test_failed_copy_leaves_no_version_directory(repo, tmp_path):
    make_version(repo.root, "m", "1")
    files = {"model.joblib": tmp_path / "src.joblib", "model.onnx": tmp_path / "does-not-exist.onnx"}
    files["model.joblib"].write_bytes(b"estimator")
    before = sorted(p.name for p in (repo.root / "m").iterdir())
    with pytest.raises(OSError):
        repo.add_version("m", files, {"artifact": "model.joblib"})
    assert sorted(p.name for p in (repo.root / "m").iterdir()) == before
    assert repo.versions("m") == [1]
    mv = repo.add_version("m", {"model.joblib": files["model.joblib"]}, {"artifact": "model.joblib"})
    assert mv.version == 2


def test_failed_first_publish_leaves_no_model(repo, tmp_path):
    with pytest.raises(OSError):
        repo.add_version("new_model", {"model.joblib": tmp_path / "missing"}, {"artifact": "model.joblib"})
    assert repo.versions("new_model") == []
    assert repo.names() == []
    folder = repo.root / "new_model"
    assert not folder.exists() or list(folder.iterdir()) == []


def test_unserialisable_metadata_fails_without_a_version(repo, tmp_path):
    class Opaque:
        def __str__(self):
            raise RuntimeError("cannot describe")

    with pytest.raises(RuntimeError):
        repo.add_version("m", source_files(tmp_path), {"artifact": "model.joblib", "bad": Opaque()})
    assert repo.versions("m") == []
    assert not (repo.root / "m").exists() or list((repo.root / "m").iterdir()) == []


def test_published_version_is_readable_by_others(repo, tmp_path):
    mv = repo.add_version("m", source_files(tmp_path), {"artifact": "model.joblib"})
    assert mv.path.stat().st_mode & 0o755 == 0o755
