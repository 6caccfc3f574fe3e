"""What serves: the models config, loading every version, resolving requests."""
from __future__ import annotations

import numpy as np
import pytest

from app.errors import ModelNotFound, ModelNotReady, VersionNotFound
from app.plan import ModelPlan, ServingPlan, read_plan
from app.registry import Registry
from app.repository import ModelRepository
from app.settings import SettingError
from tests.models import TOLERANCE, edit_metadata, flip_byte, native_model, quick_classifier


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> ModelRepository:
    """alpha v1..v3, beta v1 (native), broken v1 (good) and v2 (edited after publishing)."""
    repo = ModelRepository(tmp_path_factory.mktemp("registry"))
    for C in (0.01, 1.0, 100.0):
        quick_classifier(repo, "alpha", C=C)
    native_model(repo, "beta")
    quick_classifier(repo, "broken")
    bad = quick_classifier(repo, "broken", C=10.0)
    flip_byte(bad.path / "model.onnx")
    # Each later version was promoted (published versions wait for that).
    for name, version in (("alpha", 3), ("broken", 2)):
        repo.record(name, "promote", version, "test", "", {"version": version})
    return repo


def registry(repo: ModelRepository, plan: dict | ServingPlan) -> Registry:
    """A loaded registry serving plan ({name: pinned version or None} for short)."""
    if isinstance(plan, dict):
        plan = ServingPlan({name: p if isinstance(p, ModelPlan) else ModelPlan(p) for name, p in plan.items()})
    r = Registry(repo, lambda: plan, TOLERANCE)
    r.refresh()
    return r


def read_model_config(path, repo: ModelRepository) -> dict:
    """{name: ModelPlan} of every model the plan in path serves."""
    plan = read_plan(path)
    return {name: plan.get(name) for name in plan.names(repo)}


def write_config(tmp_path, text: str):
    path = tmp_path / "models.yaml"
    path.write_text(text)
    return path


# config/models.yaml

def test_missing_config_serves_every_model_in_the_repository(repo, tmp_path):
    assert read_model_config(tmp_path / "absent.yaml", repo) == {"alpha": ModelPlan(), "beta": ModelPlan(), "broken": ModelPlan()}


@pytest.mark.parametrize("text", ["", "# nothing\n", "models:\n", "models: {}\n", "other: 1\n"])
def test_config_without_models_serves_every_model(repo, tmp_path, text):
    assert read_model_config(write_config(tmp_path, text), repo) == {"alpha": ModelPlan(), "beta": ModelPlan(), "broken": ModelPlan()}


def test_config_lists_models_and_pins(repo, tmp_path):
    path = write_config(tmp_path, "models:\n  alpha:\n    version: 2\n  beta: {}\n  gamma:\n")
    assert read_model_config(path, repo) == {"alpha": ModelPlan(2), "beta": ModelPlan(), "gamma": ModelPlan()}


@pytest.mark.parametrize("name", ["Alpha", "../alpha", "a/b", "x" * 65, "_a", "'a b'"])
def test_config_with_a_bad_name_is_a_setting_error(repo, tmp_path, name):
    path = write_config(tmp_path, f"models:\n  {name}: {{}}\n")
    with pytest.raises(SettingError) as info:
        read_model_config(path, repo)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("version", ["0", "-1", "'2'", "1.5", "true", "[1]", "latest"])
def test_config_with_a_bad_version_is_a_setting_error(repo, tmp_path, version):
    path = write_config(tmp_path, f"models:\n  alpha:\n    version: {version}\n")
    with pytest.raises(SettingError, match="version"):
        read_model_config(path, repo)


@pytest.mark.parametrize("text", ["models:\n  - alpha\n", "models: alpha\n", "models: 3\n"])
def test_config_with_models_not_a_mapping_is_a_setting_error(repo, tmp_path, text):
    with pytest.raises(SettingError):
        read_model_config(write_config(tmp_path, text), repo)


@pytest.mark.parametrize("options", ["2", "latest", "[2]"])
def test_config_with_options_not_a_mapping_is_a_setting_error(repo, tmp_path, options):
    path = write_config(tmp_path, f"models:\n  alpha: {options}\n")
    with pytest.raises(SettingError):
        read_model_config(path, repo)


# Loading and resolving.

def test_serves_the_newest_version(repo):
    r = registry(repo, {"alpha": None, "beta": None})
    assert r.resolve("alpha").version == 3
    assert r.resolve("beta").version == 1
    assert r.not_ready() == {}
    assert sorted(r.state("alpha").versions) == [1, 2, 3]


def test_resolve_a_given_version(repo):
    r = registry(repo, {"alpha": None})
    for version in (1, 2, 3):
        model = r.resolve("alpha", version)
        assert (model.name, model.version) == ("alpha", version)
    assert r.resolve("alpha", 3) is r.resolve("alpha")


def test_versions_are_distinct_models(repo):
    r = registry(repo, {"alpha": None})
    X = np.array([[5.9, 3.0, 4.2, 1.5], [6.3, 2.8, 5.1, 1.5]], dtype=np.float32)
    p1 = r.resolve("alpha", 1).runtime.run(X).probabilities
    p3 = r.resolve("alpha", 3).runtime.run(X).probabilities
    assert not np.allclose(p1, p3)


def test_pinned_version_serves(repo):
    r = registry(repo, {"alpha": 1})
    assert r.resolve("alpha").version == 1
    assert r.resolve("alpha", 3).version == 3
    assert r.describe("alpha")["serving_version"] == 1
    assert r.describe("alpha")["versions"] == [1, 2, 3]
    assert r.describe("alpha")["status"] == "serving"


def test_pinned_version_missing_from_disk_is_not_ready(repo):
    r = registry(repo, {"alpha": 9})
    with pytest.raises(ModelNotReady):
        r.resolve("alpha")
    assert "9" in r.not_ready()["alpha"]
    assert r.resolve("alpha", 3).version == 3


def test_unknown_model_is_model_not_found(repo):
    r = registry(repo, {"alpha": None})
    with pytest.raises(ModelNotFound):
        r.resolve("nobody")
    with pytest.raises(ModelNotFound):
        r.resolve("nobody", 1)
    with pytest.raises(ModelNotFound):
        r.describe("nobody")


def test_model_on_disk_but_not_configured_is_not_served(repo):
    r = registry(repo, {"alpha": None})
    with pytest.raises(ModelNotFound):
        r.resolve("beta")


def test_unknown_version_is_version_not_found(repo):
    r = registry(repo, {"alpha": None})
    with pytest.raises(VersionNotFound):
        r.resolve("alpha", 4)
    with pytest.raises(VersionNotFound):
        r.resolve("alpha", 0)


def test_configured_model_missing_from_disk(repo):
    r = registry(repo, {"alpha": None, "ghost": None})
    assert r.resolve("alpha").version == 3
    not_ready = r.not_ready()
    assert list(not_ready) == ["ghost"]
    assert not_ready["ghost"]
    with pytest.raises(ModelNotReady):
        r.resolve("ghost")
    with pytest.raises(VersionNotFound):
        r.resolve("ghost", 1)
    assert r.describe("ghost")["status"] == "not_ready"


def test_broken_newest_version_leaves_the_model_not_ready(repo):
    r = registry(repo, {"broken": None})
    with pytest.raises(ModelNotReady) as info:
        r.resolve("broken")
    assert "broken" in str(info.value)
    assert "2" in r.not_ready()["broken"]
    older = r.resolve("broken", 1)
    assert older.version == 1 and older.runtime.name == "onnx"
    with pytest.raises(VersionNotFound):
        r.resolve("broken", 2)
    assert sorted(r.state("broken").versions) == [1]
    assert r.describe("broken")["status"] == "not_ready"


def test_not_ready_reason_says_why_the_version_was_refused(repo):
    r = registry(repo, {"broken": None})
    reason = r.not_ready()["broken"]
    assert "2" in reason and "sha256" in reason
    with pytest.raises(ModelNotReady, match="sha256"):
        r.resolve("broken")


def test_broken_version_does_not_affect_other_models(repo):
    r = registry(repo, {"alpha": None, "beta": None, "broken": None})
    assert list(r.not_ready()) == ["broken"]
    assert r.resolve("alpha").version == 3
    assert r.resolve("beta").runtime.name == "sklearn"


def test_pinning_the_good_version_of_a_broken_model_serves(repo):
    r = registry(repo, {"broken": 1})
    assert r.resolve("broken").version == 1
    assert r.not_ready() == {}


def test_load_all_from_the_config_file(repo, tmp_path):
    path = write_config(tmp_path, "models:\n  alpha:\n    version: 2\n  beta: {}\n")
    r = registry(repo, read_plan(path))
    assert r.resolve("alpha").version == 2
    assert r.resolve("beta").version == 1


def test_load_all_without_a_config_file_serves_everything(repo, tmp_path):
    r = registry(repo, read_plan(tmp_path / "absent.yaml"))
    assert r.resolve("alpha").version == 3
    assert r.resolve("beta").version == 1
    assert list(r.not_ready()) == ["broken"]


def test_reload_picks_up_a_new_version(tmp_path):
    repo = ModelRepository(tmp_path)
    quick_classifier(repo, "m")
    r = registry(repo, {"m": None})
    assert r.resolve("m").version == 1
    quick_classifier(repo, "m", C=0.5)
    r.load_model("m")
    # Published, loaded (requests may pin it), not serving until promoted.
    assert r.resolve("m").version == 1 and r.resolve("m", 2).version == 2
    repo.record("m", "promote", 2, "test", "", {"version": 2, "previous": 1})
    r.load_model("m")
    assert r.resolve("m").version == 2
    assert r.not_ready() == {}


def test_a_model_without_serving_state_serves_its_newest_version(tmp_path):
    repo = ModelRepository(tmp_path)
    quick_classifier(repo, "m")
    quick_classifier(repo, "m", C=0.5)
    (tmp_path / "m" / "serving.json").unlink()  # versions copied in by hand
    assert registry(repo, {"m": None}).resolve("m").version == 2


def test_a_model_fixed_on_disk_becomes_ready_on_reload(tmp_path):
    repo = ModelRepository(tmp_path)
    mv = quick_classifier(repo, "m")
    good = mv.metadata["onnx_sha256"]
    edit_metadata(mv.path, onnx_sha256="0" * 64)
    r = registry(repo, {"m": None})
    assert "m" in r.not_ready()
    edit_metadata(mv.path, onnx_sha256=good)
    r.load_model("m")
    assert r.not_ready() == {}
    assert r.resolve("m").version == 1
