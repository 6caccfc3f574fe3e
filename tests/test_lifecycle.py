"""Publishing and the serving-state verbs on a real repository, through the CLI."""
from __future__ import annotations

import json
import shutil

import joblib
import pytest
from sklearn.datasets import load_iris
from sklearn.ensemble import RandomForestClassifier

from app import cli


@pytest.fixture
def repo(fresh_models, monkeypatch, tmp_path):
    monkeypatch.setenv("MLSERVE_MODELS_DIR", str(fresh_models))
    monkeypatch.setenv("MLSERVE_SERVER_PID_FILE", str(tmp_path / "none.pid"))  # no server to tell
    return fresh_models


def forest(path, columns=4):
    X, y = load_iris(return_X_y=True)
    joblib.dump(RandomForestClassifier(n_estimators=10, random_state=0).fit(X[:, :columns], y), path)
    return path


def state(repo) -> dict:
    return json.loads((repo / "iris_classifier" / "serving.json").read_text())


def test_publish_waits_for_promote_then_rollback_returns(repo, tmp_path, capsys):
    assert cli.main(["models", "publish", str(forest(tmp_path / "f.joblib")), "--name", "iris_classifier",
                     "--reason", "retrained"]) == 0
    assert "published iris_classifier v2 (onnx), not serving" in capsys.readouterr().out
    assert state(repo)["version"] == 1
    assert cli.main(["models", "promote", "iris_classifier", "2", "--reason", "better"]) == 0
    assert (state(repo)["version"], state(repo)["previous"]) == (2, 1)
    assert cli.main(["models", "rollback", "iris_classifier"]) == 0
    assert state(repo)["version"] == 1
    capsys.readouterr()
    assert cli.main(["models", "versions", "iris_classifier"]) == 0
    out = capsys.readouterr().out
    assert "* v1" in out and "promote" in out and "(better)" in out and "rollback" in out


@pytest.mark.parametrize("broken", ["narrow", "not_a_model", "bad_suffix"])
def test_publish_refuses_what_cannot_serve(repo, tmp_path, capsys, broken):
    path = {"narrow": lambda: forest(tmp_path / "n.joblib", columns=3),
            "not_a_model": lambda: (tmp_path / "x.onnx").write_bytes(b"garbage") and tmp_path / "x.onnx",
            "bad_suffix": lambda: (tmp_path / "m.txt").write_text("x") and tmp_path / "m.txt"}[broken]()
    assert cli.main(["models", "publish", str(path), "--name", "iris_classifier"]) == 1
    assert "model_refused" in capsys.readouterr().err
    assert not (repo / "iris_classifier" / "2").exists()


def test_split_and_shadow_record_and_refuse_bad_input(repo, capsys):
    shutil.copytree(repo / "iris_classifier" / "1", repo / "iris_classifier" / "2")
    assert cli.main(["models", "split", "iris_classifier", "1=90,2=10"]) == 0
    assert state(repo)["split"] == {"1": 90.0, "2": 10.0}
    assert cli.main(["models", "shadow", "iris_classifier", "2"]) == 0
    assert state(repo)["shadow"] == 2
    assert cli.main(["models", "split", "iris_classifier", "off"]) == 0
    assert state(repo)["split"] == {}
    assert cli.main(["models", "split", "iris_classifier", "1:90"]) == 2
    assert cli.main(["models", "shadow", "iris_classifier", "two"]) == 2
    assert cli.main(["models", "promote", "iris_classifier", "7"]) == 1
    assert "version_not_found" in capsys.readouterr().err


def test_what_models_yaml_pins_is_not_changed_from_the_cli(repo, tmp_path, monkeypatch, capsys):
    shutil.copytree(repo / "iris_classifier" / "1", repo / "iris_classifier" / "2")
    config = tmp_path / "models.yaml"
    config.write_text("models:\n  iris_classifier: {version: 1}\n")
    monkeypatch.setenv("MLSERVE_MODELS_CONFIG", str(config))
    serving = repo / "iris_classifier" / "serving.json"
    before = serving.read_text() if serving.exists() else None
    assert cli.main(["models", "promote", "iris_classifier", "2"]) == 1
    err = capsys.readouterr().err
    assert "conflict" in err and f"pinned in {config}" in err
    assert cli.main(["models", "rollback", "iris_classifier"]) == 1
    assert (serving.read_text() if serving.exists() else None) == before
    # What is not pinned can still change.
    assert cli.main(["models", "split", "iris_classifier", "1=90,2=10"]) == 0
    assert state(repo)["split"] == {"1": 90.0, "2": 10.0}
