"""Publishing and the serving-state verbs on a real repository, through the CLI."""
from __future__ import annotations

import io
import json
import shutil
import subprocess

import joblib
import requests
import pytest
from sklearn.datasets import load_iris
from sklearn.ensemble import RandomForestClassifier

from app import cli
from tests.wait import until


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


# --- the CLI's one error boundary ---------------------------------------------

def one_line_error(capsys, argv: list[str], status: int = 1) -> str:
    """Run the CLI; it must fail with status and exactly one line on stderr, no traceback."""
    assert cli.main(argv) == status
    out, err = capsys.readouterr()
    assert err.count("\n") == 1 and err.startswith("mlserve: ") and "Traceback" not in err, err
    return err.strip()


def test_user_mistakes_are_one_line_and_status_1(repo, tmp_path, capsys):
    short = tmp_path / "short.csv"
    short.write_text("a,b,target\n" + "1,2,0\n" * 5)
    assert "5 data rows" in one_line_error(capsys, ["train", str(short), "--target", "target", "--name", "m"])
    rows = tmp_path / "rows.csv"
    rows.write_text("a,b,label\n" + "".join(f"{i},{i % 3},{i % 2}\n" for i in range(30)))
    assert "no target column 'nope'; columns: a, b, label" in one_line_error(
        capsys, ["train", str(rows), "--target", "nope", "--name", "m"])
    assert "name its column with --target" in one_line_error(capsys, ["train", str(rows), "--name", "m"])
    text = tmp_path / "notes.txt"
    text.write_text("not a model")
    assert "artifacts are .onnx, .skops, .joblib or .pkl" in one_line_error(
        capsys, ["models", "publish", str(text), "--name", "iris_classifier"])
    fake = tmp_path / "fake.onnx"
    fake.write_bytes(b"not a graph")
    assert "not a loadable ONNX model" in one_line_error(
        capsys, ["models", "publish", str(fake), "--name", "iris_classifier"])
    assert "no model named 'nope'" in one_line_error(capsys, ["models", "promote", "nope", "1"])
    assert "no model named 'nope'" in one_line_error(capsys, ["models", "versions", "nope"])
    missing = tmp_path / "missing.csv"
    assert str(missing) in one_line_error(capsys, ["train", str(missing), "--target", "t", "--name", "m"])
    assert repo.joinpath("m").exists() is False


def test_predict_without_a_running_server_is_one_line(capsys):
    from tests.server import free_port

    err = one_line_error(capsys, ["predict", "iris_classifier", "--features", "1,2,3,4",
                                  "--url", f"http://127.0.0.1:{free_port()}"])
    assert "connection_failed: cannot reach http://127.0.0.1:" in err


@pytest.mark.parametrize("text, fragment", [
    ("models:\n  iris_classifier: {versoin: 2}\n", "models.iris_classifier.versoin: unknown option; allowed: version"),
    ("models:\n  iris_classifier: {version: [\n", "not valid YAML at line"),
    ("models: [iris_classifier]\n", "models: expected a mapping of model name to options"),
])
def test_a_broken_models_yaml_is_one_line(repo, tmp_path, monkeypatch, capsys, text, fragment):
    config = tmp_path / "models.yaml"
    config.write_text(text)
    monkeypatch.setenv("MLSERVE_MODELS_CONFIG", str(config))
    assert fragment in one_line_error(capsys, ["models", "promote", "iris_classifier", "1"])


# --- publish means serve --------------------------------------------------------

def test_a_model_not_in_the_models_yaml_list_is_refused_with_the_fix(repo, tmp_path, monkeypatch, capsys):
    config = tmp_path / "models.yaml"
    config.write_text("models:\n  iris_classifier: {}\n")
    monkeypatch.setenv("MLSERVE_MODELS_CONFIG", str(config))
    err = one_line_error(capsys, ["models", "publish", str(forest(tmp_path / "f.joblib")), "--name", "my_model"])
    assert f"my_model is not listed in {config}" in err and "add 'my_model: {}' under models:" in err
    assert not (repo / "my_model").exists()


@pytest.mark.server
def test_a_model_published_under_a_new_name_is_served_after_the_reload(repo, tmp_path, monkeypatch, capsys):
    from tests.server import Server

    with Server(repo, workers=1) as server:  # the shipped config/models.yaml
        monkeypatch.setenv("MLSERVE_SERVER_PID_FILE", str(server.pid_file))
        assert cli.main(["models", "publish", str(forest(tmp_path / "f.joblib")), "--name", "my_model"]) == 0
        out = capsys.readouterr().out
        assert "published my_model v1 (onnx), serving" in out and "sent SIGHUP to the master" in out

        def answered() -> dict | None:
            r = requests.post(server.url + "/api/v1/predict",
                              json={"model_name": "my_model", "features": [5.1, 3.5, 1.4, 0.2]})
            return r.json() if r.status_code == 200 else None
        assert until(answered, what="my_model is served")["model_version"] == 1


# --- the CLI talks to the server it means ---------------------------------------

@pytest.mark.server
@pytest.mark.parametrize("content", ["{pid}\n", '{{"pid": {pid}, "start_time": 1, "models_dir": "{models}"}}\n'])
def test_a_pid_file_naming_another_process_is_stale_and_nothing_is_signalled(repo, tmp_path, monkeypatch, capsys,
                                                                              content):
    bystander = subprocess.Popen(["sleep", "60"])
    try:
        pid_file = tmp_path / "server.pid"
        pid_file.write_text(content.format(pid=bystander.pid, models=repo))
        monkeypatch.setenv("MLSERVE_SERVER_PID_FILE", str(pid_file))
        assert cli.main(["models", "shadow", "iris_classifier", "off"]) == 0
        out = capsys.readouterr().out
        assert "signalled nothing" in out and str(pid_file) in out and "SIGHUP" not in out
        assert bystander.poll() is None  # alive: not signalled
    finally:
        bystander.kill()
        bystander.wait()


def test_without_a_running_server_the_cli_names_where_it_looked(repo, tmp_path, capsys):
    assert cli.main(["models", "shadow", "iris_classifier", "off"]) == 0
    out = capsys.readouterr().out
    assert f"no running server found: no pid file at {tmp_path / 'none.pid'} (server.pid_file), no Redis (redis.url)" in out
    assert "--url or MLSERVE_URL" in out


@pytest.mark.server
def test_lifecycle_commands_reach_a_server_elsewhere_with_url(fresh_models, tmp_path, monkeypatch, capsys):
    from tests.server import Server

    shutil.copytree(fresh_models / "iris_classifier" / "1", fresh_models / "iris_classifier" / "2")
    local = tmp_path / "elsewhere"  # what the CLI would change without --url: not the server's repository
    monkeypatch.setenv("MLSERVE_MODELS_DIR", str(local))
    with Server(fresh_models, workers=1, env={"MLSERVE_SERVER_ADMIN_TOKEN": "t0ken"}) as server:
        def version() -> int:
            return requests.post(server.url + "/api/v1/predict", json={
                "model_name": "iris_classifier", "features": [5.1, 3.5, 1.4, 0.2], "use_cache": False}).json()["model_version"]
        assert cli.main(["models", "promote", "iris_classifier", "2", "--url", server.url, "--api-key", "t0ken"]) == 0
        out = capsys.readouterr().out
        assert "iris_classifier: serving v2 (previous v1)" in out and f"{server.url} is reloading" in out
        until(lambda: version() == 2, what="the server serves v2")
        monkeypatch.setenv("MLSERVE_URL", server.url)
        monkeypatch.setenv("MLSERVE_API_KEY", "t0ken")
        assert cli.main(["models", "rollback", "iris_classifier"]) == 0
        until(lambda: version() == 1, what="the server serves v1 again")
        monkeypatch.setenv("MLSERVE_API_KEY", "wrong")
        err = one_line_error(capsys, ["models", "promote", "iris_classifier", "2"])
        assert "unauthorized: the admin token is not valid" in err
    assert not local.exists()


# --- slow steps, and decisions made once -----------------------------------------

def test_slow_steps_are_announced_and_quick_ones_are_not():
    from app.cli.output import Steps

    stream = io.StringIO()
    with Steps(stream, after=0.0) as steps:
        steps("converting to ONNX")
        until(lambda: "converting to ONNX" in stream.getvalue(), what="the step is announced")
    quiet = io.StringIO()
    with Steps(quiet, after=30.0) as steps:
        steps("loading")
    assert quiet.getvalue() == ""


def test_publish_says_what_it_is_doing(repo, tmp_path, monkeypatch):
    from app.cli import models

    steps = []
    monkeypatch.setattr(models, "Steps", lambda stream: Recorder(steps))
    assert cli.main(["models", "publish", str(forest(tmp_path / "g.joblib")), "--name", "iris_classifier"]) == 0
    assert steps[:3] == [f"loading {tmp_path / 'g.joblib'}", "converting to ONNX",
                         "verifying ONNX Runtime against scikit-learn on 64 reference rows"]
    assert steps[-1].startswith("writing iris_classifier's next version to ")


class Recorder:
    def __init__(self, steps: list):
        self.steps = steps

    def __call__(self, step: str) -> None:
        self.steps.append(step)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        pass


def test_a_failed_conversion_is_recorded_once_in_words_and_not_tried_again(repo, tmp_path, monkeypatch, capsys):
    from sklearn.svm import SVC

    from app import conversion, loader
    from app.repository import ModelRepository

    X, y = load_iris(return_X_y=True)
    joblib.dump(SVC().fit(X, y), tmp_path / "svc.joblib")
    assert cli.main(["models", "publish", str(tmp_path / "svc.joblib"), "--name", "iris_classifier"]) == 0
    out = capsys.readouterr().out
    assert "published iris_classifier v2 (sklearn)" in out
    meta = json.loads((repo / "iris_classifier" / "2" / "metadata.json").read_text())
    assert meta["conversion"]["reason"] == ("SVC has no predict_proba (SVC without probability=True); "
                                            "served by scikit-learn, which gives labels only")

    def no_conversion(*args, **kwargs):
        raise AssertionError("converted again at load")
    monkeypatch.setattr(loader, "convert_and_verify", no_conversion)
    model = loader.load(ModelRepository(repo).get("iris_classifier", 2), 1e-5)
    assert model.runtime.name == "sklearn" and model.runtime_reason == meta["conversion"]["reason"]
    monkeypatch.setattr(loader, "convert_and_verify", conversion.convert_and_verify)
    assert loader.load(ModelRepository(repo).get("iris_classifier", 2), 1e-5, reconvert=True).runtime.name == "sklearn"


def test_library_warnings_stay_out_of_the_cli(repo, tmp_path, capsys):
    rows = tmp_path / "rows.csv"
    X, y = load_iris(return_X_y=True)
    rows.write_text("a,b,c,d,label\n" + "".join(",".join(map(str, [*x, t])) + "\n" for x, t in zip(X, y)))
    # SVC(probability=True) is deprecated in scikit-learn 1.9: it warns on fit and on predict_proba.
    assert cli.main(["train", str(rows), "--target", "label", "--name", "svm_model", "--algorithm", "svm"]) == 0
    assert "Warning" not in capsys.readouterr().err
