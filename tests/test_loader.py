"""Loading a version from disk: integrity checks come before anything runs."""
from __future__ import annotations

import pickle
from pathlib import Path

import joblib
import pytest

from app.errors import InvalidModel
from app.loader import load
from app.repository import ModelRepository
from tests.models import (TOLERANCE, edit_metadata, flip_byte, mlp_classifier_onnx, native_model,
                          quick_classifier, sha256_hex, write_metadata, write_onnx_version)


@pytest.fixture
def repo(tmp_path) -> ModelRepository:
    return ModelRepository(tmp_path / "models")


def reload(repo: ModelRepository, name: str, version: int = 1):
    return load(repo.get(name, version), TOLERANCE)


def bare_onnx(repo: ModelRepository, name: str = "bare") -> Path:
    return write_onnx_version(repo.root, name, 1, mlp_classifier_onnx(),
                              {"task": "classification", "feature_names": ["a", "b", "c", "d"], "classes": [0, 1, 2]})


class CreatesMarker:
    """Unpickling this opens (creating) the marker file: proof that the pickle ran."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "a"))


def test_good_versions_load(repo):
    quick_classifier(repo, "converted")
    native_model(repo, "native")
    bare_onnx(repo)
    assert reload(repo, "converted").runtime.name == "onnx"
    assert reload(repo, "native").runtime.name == "sklearn"
    assert reload(repo, "bare").runtime.name == "onnx"


# Checksums.

def test_edited_onnx_of_a_converted_model_is_refused(repo):
    mv = quick_classifier(repo, "m")
    flip_byte(mv.path / "model.onnx")
    with pytest.raises(InvalidModel, match="sha256") as info:
        reload(repo, "m")
    assert "model.onnx" in str(info.value) and "m v1" in str(info.value)


def test_edited_joblib_of_a_converted_model_is_refused(repo):
    mv = quick_classifier(repo, "m")
    flip_byte(mv.path / "model.joblib")
    with pytest.raises(InvalidModel, match="sha256") as info:
        reload(repo, "m")
    assert "model.joblib" in str(info.value)


def test_edited_joblib_of_a_native_model_is_refused(repo):
    mv = native_model(repo, "m")
    assert mv.metadata["serving_runtime"] == "sklearn"
    flip_byte(mv.path / "model.joblib")
    with pytest.raises(InvalidModel, match="sha256") as info:
        reload(repo, "m")
    assert "model.joblib" in str(info.value)


@pytest.mark.parametrize("where", ["start", "middle", "end"])
def test_edited_bare_onnx_is_refused(repo, where):
    folder = bare_onnx(repo)
    size = (folder / "model.onnx").stat().st_size
    flip_byte(folder / "model.onnx", {"start": 0, "middle": size // 2, "end": size - 1}[where])
    with pytest.raises(InvalidModel, match="sha256"):
        reload(repo, "bare")


def test_appended_bytes_are_refused(repo):
    mv = native_model(repo, "m")
    with open(mv.path / "model.joblib", "ab") as f:
        f.write(b"\0")
    with pytest.raises(InvalidModel, match="sha256"):
        reload(repo, "m")


def test_missing_sha256_of_a_native_model_is_refused(repo):
    mv = native_model(repo, "m")
    edit_metadata(mv.path, drop=("sha256",))
    with pytest.raises(InvalidModel, match="sha256"):
        reload(repo, "m")


@pytest.mark.parametrize("value", [None, ""])
def test_empty_sha256_is_refused(repo, value):
    mv = native_model(repo, "m")
    edit_metadata(mv.path, sha256=value)
    with pytest.raises(InvalidModel, match="sha256"):
        reload(repo, "m")


def test_missing_sha256_of_a_bare_onnx_model_is_refused(repo):
    folder = bare_onnx(repo)
    edit_metadata(folder, drop=("sha256",))
    with pytest.raises(InvalidModel, match="sha256"):
        reload(repo, "bare")


def test_missing_onnx_sha256_of_a_converted_model_is_refused(repo):
    mv = quick_classifier(repo, "m")
    edit_metadata(mv.path, drop=("onnx_sha256",))
    with pytest.raises(InvalidModel, match="sha256"):
        reload(repo, "m")


def test_missing_sha256_of_a_converted_model_is_refused(repo):
    mv = quick_classifier(repo, "m")
    edit_metadata(mv.path, drop=("sha256",))
    with pytest.raises(InvalidModel, match="sha256"):
        reload(repo, "m")


def test_sha256_of_the_wrong_file_is_refused(repo):
    mv = quick_classifier(repo, "m")
    edit_metadata(mv.path, onnx_sha256=mv.metadata["sha256"])
    with pytest.raises(InvalidModel, match="sha256"):
        reload(repo, "m")


def test_missing_onnx_file_of_a_converted_model_is_refused(repo):
    mv = quick_classifier(repo, "m")
    (mv.path / "model.onnx").unlink()
    with pytest.raises(InvalidModel):
        reload(repo, "m")


# Files that match their checksum but are not what they claim.

@pytest.mark.parametrize("content", [b"", b"not an onnx graph", b"\x08\x07\x12\x04junk" * 10])
def test_corrupt_bare_onnx_with_matching_sha256_is_invalid_model(repo, content):
    folder = bare_onnx(repo)
    (folder / "model.onnx").write_bytes(content)
    edit_metadata(folder, sha256=sha256_hex(folder / "model.onnx"))
    with pytest.raises(InvalidModel) as info:
        reload(repo, "bare")
    assert "bare v1" in str(info.value)


def test_truncated_bare_onnx_with_matching_sha256_is_invalid_model(repo):
    folder = bare_onnx(repo)
    data = (folder / "model.onnx").read_bytes()
    (folder / "model.onnx").write_bytes(data[: len(data) // 2])
    edit_metadata(folder, sha256=sha256_hex(folder / "model.onnx"))
    with pytest.raises(InvalidModel):
        reload(repo, "bare")


def test_corrupt_converted_onnx_with_matching_sha256_is_invalid_model(repo):
    mv = quick_classifier(repo, "m")
    data = (mv.path / "model.onnx").read_bytes()
    (mv.path / "model.onnx").write_bytes(data[: len(data) // 3])
    edit_metadata(mv.path, onnx_sha256=sha256_hex(mv.path / "model.onnx"))
    with pytest.raises(InvalidModel):
        reload(repo, "m")


def test_corrupt_joblib_with_matching_sha256_is_invalid_model(repo):
    mv = native_model(repo, "m")
    (mv.path / "model.joblib").write_bytes(b"this is not a pickle")
    edit_metadata(mv.path, sha256=sha256_hex(mv.path / "model.joblib"))
    with pytest.raises(InvalidModel):
        reload(repo, "m")


def test_bare_onnx_with_two_inputs_is_invalid_model(repo):
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Add", ["a", "b"], ["y"])], "two",
        [helper.make_tensor_value_info("a", TensorProto.FLOAT, [None, 2]),
         helper.make_tensor_value_info("b", TensorProto.FLOAT, [None, 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 2])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    write_onnx_version(repo.root, "two", 1, model, {"task": "regression"})
    with pytest.raises(InvalidModel, match="inputs"):
        reload(repo, "two")


# Pickles: never run unless their checksum matches.

@pytest.mark.parametrize("artifact", ["model.pkl", "model.joblib"])
def test_pickle_with_mismatched_sha256_is_never_loaded(repo, tmp_path, artifact):
    marker = tmp_path / "pickle-ran"
    folder = repo.root / "evil" / "1"
    folder.mkdir(parents=True)
    (folder / artifact).write_bytes(b"the bytes that were published")
    published_sha = sha256_hex(folder / artifact)
    (folder / artifact).write_bytes(pickle.dumps(CreatesMarker(marker)))
    write_metadata(folder, {"artifact": artifact, "sha256": published_sha, "task": "classification",
                            "feature_names": ["a", "b"]})

    with pytest.raises(InvalidModel, match="sha256"):
        reload(repo, "evil")
    assert not marker.exists()

    # The same file does run code when unpickled: the refusal is what kept it from running.
    opened = joblib.load(folder / artifact)
    opened.close()
    assert marker.exists()


def test_pickle_without_sha256_is_never_loaded(repo, tmp_path):
    marker = tmp_path / "pickle-ran"
    folder = repo.root / "evil" / "1"
    folder.mkdir(parents=True)
    (folder / "model.pkl").write_bytes(pickle.dumps(CreatesMarker(marker)))
    write_metadata(folder, {"artifact": "model.pkl", "task": "classification", "feature_names": ["a", "b"]})
    with pytest.raises(InvalidModel, match="sha256"):
        reload(repo, "evil")
    assert not marker.exists()


def test_verified_conversion_serves_the_graph_without_unpickling(repo, tmp_path):
    marker = tmp_path / "pickle-ran"
    mv = quick_classifier(repo, "m")
    (mv.path / "model.joblib").write_bytes(pickle.dumps(CreatesMarker(marker)))
    edit_metadata(mv.path, sha256=sha256_hex(mv.path / "model.joblib"))
    model = reload(repo, "m")
    assert model.runtime.name == "onnx"
    assert not marker.exists()


# Metadata that does not describe the model.

@pytest.mark.parametrize("task", ["ranking", "", 3, "Classification"])
def test_unknown_task_is_refused(repo, task):
    mv = quick_classifier(repo, "m")
    edit_metadata(mv.path, task=task)
    with pytest.raises(InvalidModel, match="task"):
        reload(repo, "m")


def test_feature_names_of_the_wrong_width_are_refused(repo):
    mv = quick_classifier(repo, "m")
    edit_metadata(mv.path, feature_names=["a", "b", "c"])
    with pytest.raises(InvalidModel, match="features"):
        reload(repo, "m")


def test_feature_names_of_the_wrong_width_are_refused_for_native_models(repo):
    mv = native_model(repo, "m")
    edit_metadata(mv.path, feature_names=["a", "b", "c", "d", "e"])
    with pytest.raises(InvalidModel, match="features"):
        reload(repo, "m")


def test_loaded_model_describes_itself(repo):
    mv = quick_classifier(repo, "m")
    model = reload(repo, "m")
    assert (model.name, model.version, model.task) == ("m", 1, "classification")
    assert model.feature_names == ["sl", "sw", "pl", "pw"]
    assert model.n_features == 4
    assert model.feature_index == {"sl": 0, "sw": 1, "pl": 2, "pw": 3}
    assert model.classes == [0, 1, 2]
    assert model.class_keys == ["0", "1", "2"]
    info = model.info()
    assert info["runtime"] == "onnx" and info["runtime_reason"] is None
    assert info["sha256"] == mv.metadata["sha256"] == sha256_hex(mv.path / "model.joblib")
    assert info["algorithm"] == "LogisticRegression"
    assert info["features"] == model.feature_names


def test_loading_does_not_change_the_files(repo):
    mv = quick_classifier(repo, "m")
    before = {p.name: p.read_bytes() for p in mv.path.iterdir()}
    reload(repo, "m")
    after = {p.name: p.read_bytes() for p in mv.path.iterdir()}
    assert before == after

