"""The MLflow registry for real: a running `mlflow server`, models logged and
registered through the MLflow client, published here from models:/ URIs, and
an alias followed by running servers: when it moves, the new version rolls
out with no failed request; a version that fails its checks is refused and
the old one keeps serving. One host per Redis fetches; the others reload."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import requests

from app import cli
from tests.mlflow_server import Team
from tests.models import dataset, read_metadata
from tests.server import Server
from tests import test_swap
from tests.wait import until

pytestmark = pytest.mark.server
TREE = "sklearn.tree._tree.Tree"
IRIS = [5.1, 3.5, 1.4, 0.2]


@pytest.fixture(scope="module")
def team(mlflow_server):
    return Team(mlflow_server.url)


@pytest.fixture
def env(mlflow_server, tmp_path, monkeypatch):
    models = tmp_path / "models"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.url)
    monkeypatch.setenv("MLSERVE_MODELS_DIR", str(models))
    monkeypatch.setenv("MLSERVE_SERVER_PID_FILE", str(tmp_path / "none.pid"))
    return models


def forest(n_estimators=10, seed=0):
    from sklearn.ensemble import RandomForestClassifier

    X, y, _ = dataset("iris")
    return RandomForestClassifier(n_estimators=n_estimators, max_depth=4, random_state=seed).fit(X, y), X


def unique(name: str, request) -> str:
    return f"{name}-{request.node.name[-20:]}".lower().replace("[", "").replace("]", "")[:60]


def test_a_registered_skops_model_is_published_with_its_provenance(team, env, request, capsys):
    name = unique("iris", request)
    estimator, X = forest()
    version = team.log_sklearn(name, estimator, X, {"accuracy": 0.97, "f1": 0.96}, skops_trusted_types=[TREE])
    assert cli.main(["models", "publish", f"models:/{name}/{version}", "--name", "iris_reg"]) == 0
    assert f"fetched models:/{name}/{version}" in capsys.readouterr().out
    meta = read_metadata(env / "iris_reg" / "1")
    assert meta["metrics"] == {"accuracy": 0.97, "f1": 0.96}
    assert meta["mlflow"]["model_uri"] == f"models:/{name}/{version}" and meta["mlflow"]["run_id"]
    assert meta["mlflow"]["registered_version"] == version and meta["skops_trusted_types"] == [TREE]
    assert meta["artifact"] == "model.skops" and meta["serving_runtime"] == "onnx"
    assert X[:5].astype(np.float32).tolist()[0] in meta["reference_sample"]


def test_an_alias_and_an_onnx_model_resolve_through_the_registry(team, env, request, capsys):
    from skl2onnx import to_onnx
    from sklearn.linear_model import LogisticRegression

    name = unique("iris-onnx", request)
    X, y, _ = dataset("iris")
    regression = LogisticRegression(max_iter=1000).fit(X, y)
    graph = to_onnx(regression, X[:1].astype(np.float32), options={id(regression): {"zipmap": False}})
    team.log_onnx(name, graph, X.astype(np.float32), {"accuracy": 0.95})
    version = team.log_onnx(name, graph, X.astype(np.float32), {"accuracy": 0.96})
    team.set_alias(name, "champion", version)
    assert cli.main(["models", "publish", f"models:/{name}@champion", "--name", "iris_onnx", "--classes", "0,1,2"]) == 0
    meta = read_metadata(env / "iris_onnx" / "1")
    assert meta["mlflow"]["alias"] == "champion" and meta["mlflow"]["registered_version"] == version
    assert meta["metrics"] == {"accuracy": 0.96} and meta["artifact"] == "model.onnx"


def test_registry_mistakes_are_one_line(team, env, request, capsys):
    name = unique("pickled", request)
    estimator, X = forest()
    version = team.log_sklearn(name, estimator, X, serialization_format="cloudpickle")
    capsys.readouterr()  # MLflow's own warnings while logging
    cases = [
        ([f"models:/{name}/{version}", "--name", "p"], "a pickle from the registry is never loaded"),
        ([f"models:/{name}@nope", "--name", "p"], "alias nope not found"),
        (["models:/no-such-model/1", "--name", "p"], "not found"),
        ([f"models:/{name.upper()}/{version}"], "is not a model name here"),
    ]
    for argv, expected in cases:
        assert cli.main(["models", "publish", *argv]) == 1
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and expected in err, err
    assert not (env / "p").exists()


class Load(test_swap.Load):
    """Keep-alive clients predicting with model iris, recording every answer."""

    def run(self) -> None:
        import time

        session = requests.Session()
        body = {"model_name": "iris", "features": IRIS, "use_cache": False}
        while not self.stop.is_set():
            try:
                r = session.post(self.url + "/api/v1/predict", json=body, timeout=10)
                if r.status_code != 200 or r.json()["prediction"] != 0:
                    self.failures.append(f"{r.status_code} {r.text[:200]}")
                else:
                    self.answers.append((time.monotonic(), r.json()["model_version"]))
            except requests.RequestException as exc:
                self.failures.append(repr(exc))


def follower_env(redis_url: str, mlflow_url: str) -> dict:
    return {"MLSERVE_REDIS_URL": redis_url, "MLFLOW_TRACKING_URI": mlflow_url, "MLSERVE_MLFLOW_FOLLOW_INTERVAL": "0.5",
            "MLSERVE_SERVER_ADMIN_TOKEN": "t"}


def serving(server: Server, model: str) -> int | None:
    return requests.get(f"{server.url}/api/v1/models/{model}", timeout=10).json().get("serving_version")


def alias_metric(server: Server, model: str, result: str) -> float:
    text = requests.get(server.url + "/metrics", timeout=10).text
    line = f'mlserve_alias_checks_total{{model="{model}",result="{result}"}}'
    return next((float(v.split()[-1]) for v in text.splitlines() if v.startswith(line)), 0.0)


def test_following_an_alias_rolls_out_each_move_on_every_host(team, env, request, redis_server, mlflow_server,
                                                              capsys):
    name = unique("champion", request)
    first, X = forest(10, 0)
    v1 = team.log_sklearn(name, first, X, {"accuracy": 0.9}, skops_trusted_types=[TREE])
    team.set_alias(name, "champion", v1)
    capsys.readouterr()
    assert cli.main(["models", "follow", f"{name}@champion", "--name", "iris"]) == 0
    assert f"iris follows models:/{name}@champion" in capsys.readouterr().out
    shared = env
    settings = follower_env(redis_server.url, mlflow_server.url)
    with Server(shared, workers=2, env=settings) as host_a, Server(shared, workers=2, env=settings) as host_b:
        until(lambda: host_a.follower_pid() and host_b.follower_pid(), what="both hosts run an alias follower")
        assert serving(host_a, "iris") == serving(host_b, "iris") == 1
        # The alias moves to a retrained forest while host A is under keep-alive load.
        second, _ = forest(25, 1)
        v2 = team.log_sklearn(name, second, X, {"accuracy": 0.95}, skops_trusted_types=[TREE])
        with Load(host_a.url) as load:
            until(lambda: len(load.answers) >= 50, what="load is running")
            team.set_alias(name, "champion", v2)
            until(lambda: serving(host_a, "iris") == 2 and serving(host_b, "iris") == 2, timeout=60,
                  what="both hosts serve the new version")
            until(lambda: sum(v == 2 for _, v in list(load.answers)) > 200, what="answers from the new version")
        assert load.failures == []
        # One host fetched and published it: one new version, not two.
        assert sorted(p.name for p in shared.joinpath("iris").iterdir() if p.is_dir()) == ["1", "2"]
        meta = read_metadata(shared / "iris" / "2")
        assert meta["mlflow"]["registered_version"] == v2 and meta["metrics"] == {"accuracy": 0.95}
        history = json.loads((shared / "iris" / "serving.json").read_text())["history"]
        assert [h["action"] for h in history if h["by"].startswith("mlflow-follower")] == ["publish", "promote", "follow"]
        assert alias_metric(host_a, "iris", "promoted") + alias_metric(host_b, "iris", "promoted") == 1

        # A version that fails its checks (it takes 3 features, not 4) is refused; v2 keeps serving.
        X3 = X[:, :3]
        from sklearn.ensemble import RandomForestClassifier

        narrow = RandomForestClassifier(n_estimators=5, random_state=0).fit(X3, dataset("iris")[1])
        v3 = team.log_sklearn(name, narrow, X3, skops_trusted_types=[TREE])
        team.set_alias(name, "champion", v3)
        until(lambda: alias_metric(host_a, "iris", "refused") + alias_metric(host_b, "iris", "refused") == 1,
              timeout=30, what="the refusal is counted")
        refusal = f"models:/{name}@champion moved to v{v3}, refused"
        assert refusal in host_a.log() + host_b.log()
        assert "it takes 3 features, v2 takes 4" in host_a.log() + host_b.log()
        assert serving(host_a, "iris") == serving(host_b, "iris") == 2
        assert not (shared / "iris" / "3").exists()
        # The alias moves back to v1: the version here that holds it serves again, nothing is fetched.
        team.set_alias(name, "champion", v1)
        until(lambda: serving(host_a, "iris") == 1 and serving(host_b, "iris") == 1, timeout=60,
              what="the alias moved back")
        assert not (shared / "iris" / "3").exists()


def test_a_followed_alias_in_models_yaml(team, env, request, mlflow_server, tmp_path, capsys, monkeypatch):
    name = unique("yaml", request)
    estimator, X = forest()
    v1 = team.log_sklearn(name, estimator, X, skops_trusted_types=[TREE])
    team.set_alias(name, "prod", v1)
    config = tmp_path / "models.yaml"
    config.write_text(f"models:\n  iris_yaml:\n    follow: models:/{name}@prod\n")
    settings = {"MLFLOW_TRACKING_URI": mlflow_server.url, "MLSERVE_MLFLOW_FOLLOW_INTERVAL": "0.5"}
    env.mkdir()
    server = Server(env, workers=1, env=settings, models_config=config).start(ready=False)
    try:
        # No version here yet: the follower publishes the first one, which serves at once.
        until(lambda: serving(server, "iris_yaml") == 1, timeout=60, what="the first version is published")
        assert read_metadata(env / "iris_yaml" / "1")["mlflow"]["alias"] == "prod"
        # Pinned in models.yaml: the CLI cannot change what it follows.
        monkeypatch.setenv("MLSERVE_MODELS_CONFIG", str(config))
        assert cli.main(["models", "unfollow", "iris_yaml"]) == 1
        assert "follow is pinned" in capsys.readouterr().err
    finally:
        server.stop()
    shutil.rmtree(env)


def test_unfollow_stops_the_follower(team, env, request, mlflow_server, capsys, monkeypatch):
    name = unique("unfollow", request)
    estimator, X = forest()
    team.set_alias(name, "a", team.log_sklearn(name, estimator, X, skops_trusted_types=[TREE]))
    assert cli.main(["models", "follow", f"{name}@a", "--name", "iris"]) == 0
    settings = {"MLFLOW_TRACKING_URI": mlflow_server.url, "MLSERVE_MLFLOW_FOLLOW_INTERVAL": "0.5"}
    with Server(env, workers=1, env=settings) as server:
        until(server.follower_pid, what="the follower runs")
        monkeypatch.setenv("MLSERVE_SERVER_PID_FILE", str(server.pid_file))
        assert cli.main(["models", "unfollow", "iris"]) == 0
        assert "sent SIGHUP to the master" in capsys.readouterr().out
        until(lambda: server.follower_pid() is None, what="the follower stops once nothing is followed")
        assert serving(server, "iris") == 1
