"""skops artifacts: loaded without unpickling, trusting only listed types
from scikit-learn, numpy and scipy; published and served like joblib ones."""
from __future__ import annotations

import numpy as np
import pytest
import skops.io

from app.errors import InvalidModel, ModelRefused
from app.lifecycle import Lifecycle
from app.loader import load
from app.publishing import Publisher
from app.repository import ModelRepository
from app.skops_models import load_skops
from tests.models import dataset, fit

TREE = "sklearn.tree._tree.Tree"


@pytest.fixture
def forest_file(tmp_path):
    fitted = fit("random_forest")
    path = tmp_path / "forest.skops"
    skops.io.dump(fitted.estimator, path)
    return path, fitted


def test_a_forest_loads_only_when_its_tree_type_is_trusted(forest_file):
    path, fitted = forest_file
    with pytest.raises(InvalidModel, match=f"types that are not trusted: {TREE}"):
        load_skops(path)
    loaded = load_skops(path, [TREE])
    assert (loaded.predict(fitted.X_test) == fitted.estimator.predict(fitted.X_test)).all()


@pytest.mark.parametrize("bad", ["builtins.eval", "os.system", "posix.system", "subprocess.Popen"])
def test_types_outside_scikit_learn_numpy_and_scipy_are_never_trusted(forest_file, bad):
    path, _ = forest_file
    with pytest.raises(InvalidModel, match="only types from scikit-learn, numpy and scipy"):
        load_skops(path, [TREE, bad])


def test_a_damaged_skops_file_is_refused_with_the_reason(tmp_path):
    path = tmp_path / "model.skops"
    path.write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(InvalidModel, match="not a readable skops file"):
        load_skops(path)


def test_publishing_a_skops_forest_keeps_the_skops_file_and_serves_onnx(forest_file, tmp_path):
    path, fitted = forest_file
    repository = ModelRepository(tmp_path / "models")
    publisher = Publisher(Lifecycle(repository, 1e-5))
    with pytest.raises(ModelRefused, match=f"not trusted: {TREE}"):
        publisher.publish(path, "forest")
    mv = publisher.publish(path, "forest", trusted=[TREE], sample=fitted.X_test.tolist())
    assert sorted(p.name for p in mv.path.iterdir()) == ["metadata.json", "model.onnx", "model.skops"]
    assert mv.metadata["source_format"] == "skops" and mv.metadata["skops_trusted_types"] == [TREE]
    assert mv.metadata["conversion"]["verified"] is True
    model = load(mv, 1e-5)
    assert model.runtime.name == "onnx"
    rows = fitted.X_test.astype(np.float32)
    assert (model.runtime.run(rows).labels == fitted.estimator.predict(rows)).all()


def test_a_skops_model_without_an_onnx_conversion_is_served_by_scikit_learn_from_skops(tmp_path):
    from sklearn.cluster import DBSCAN

    X, _, _ = dataset("iris")
    path = tmp_path / "clusters.skops"
    skops.io.dump(DBSCAN(eps=0.5, min_samples=5).fit(X), path)
    repository = ModelRepository(tmp_path / "models")
    mv = Publisher(Lifecycle(repository, 1e-5)).publish(path, "clusters", sample=X[:20].tolist())
    assert mv.metadata["artifact"] == "model.skops" and mv.metadata["serving_runtime"] == "sklearn"
    model = load(mv, 1e-5)
    assert model.runtime.name == "sklearn"
    assert list(model.runtime.run(X[:3].astype(np.float32)).labels) == [0, 0, 0]


def test_a_skops_model_that_must_serve_on_onnx_is_refused_when_it_cannot(tmp_path):
    from sklearn.cluster import DBSCAN

    X, _, _ = dataset("iris")
    path = tmp_path / "clusters.skops"
    skops.io.dump(DBSCAN().fit(X), path)
    publisher = Publisher(Lifecycle(ModelRepository(tmp_path / "models"), 1e-5))
    with pytest.raises(ModelRefused, match="must convert to a verified ONNX graph"):
        publisher.publish(path, "clusters", require_onnx=True)
    assert not (tmp_path / "models" / "clusters" / "1").exists()
