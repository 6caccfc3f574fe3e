"""The reference client example (tests/data/reference_client.py, kept exactly
as published with the API) runs against the real server and gets right answers."""
from __future__ import annotations

import pytest

import runpy
import sys
from pathlib import Path

CLIENT = Path(__file__).parent / "data" / "reference_client.py"


@pytest.mark.server
def test_reference_client_example_runs_unchanged(server, tmp_path, capsys):
    # Only the address differs: the example hard-codes localhost:8080.
    source = CLIENT.read_text().replace("http://localhost:8080", server.url)
    script = tmp_path / "ml_client.py"
    script.write_text(source)
    runpy.run_path(str(script), run_name="__main__")
    out = capsys.readouterr().out
    assert "Prediction: 0" in out          # 5.1, 3.5, 1.4, 0.2 is a setosa
    assert "Predictions: [0, 1, 2]" in out  # one of each species
    assert '"task": "classification"' in out
    assert "P99 latency" in out


@pytest.mark.server
def test_reference_client_against_every_demo_model(server):
    sys.path.insert(0, str(CLIENT.parent))
    try:
        from reference_client import MLClient
    finally:
        sys.path.pop(0)
    client = MLClient(base_url=server.url)
    assert client.health_check()["status"] == "healthy"
    for name in ("iris_classifier", "binary_classifier", "diabetes_regressor", "wine_clusters"):
        info = client.get_model_info(name)
        width = len(info["features"])
        result = client.predict(name, [0.1] * width)
        assert result["model_name"] == name and result["model_version"] == 1
        batch = client.batch_predict(name, [[0.1] * width] * 3)
        assert batch["count"] == 3 and batch["predictions"] == [result["prediction"]] * 3
    assert "mlserve_requests_total" in client.get_metrics()
