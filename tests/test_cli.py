"""The mlserve commands that talk to a running server, run in-process against a real one."""
from __future__ import annotations

import csv
import io
import json
import sys

import pytest
from sklearn.datasets import load_diabetes, load_iris

from app.cli import main
from tests.server import free_port

IRIS_FEATURES = ["sepal_length", "sepal_width", "petal_length", "petal_width"]
DIABETES_FEATURES = ["age", "sex", "bmi", "bp", "s1", "s2", "s3", "s4", "s5", "s6"]


def run(capsys, *argv: str) -> tuple[int, str, str]:
    status = main(list(argv))
    out, err = capsys.readouterr()
    return status, out, err


def read_csv(path) -> list[list[str]]:
    with open(path, newline="") as f:
        return list(csv.reader(f))


def write_csv(path, header: list[str] | None, rows) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        if header:
            writer.writerow(header)
        writer.writerows(rows)


def iris_csv(path) -> list[dict[str, str]]:
    """All 150 iris rows with the columns shuffled and a species column the model does not use."""
    data = load_iris()
    header = ["petal_width", "species", "sepal_length", "petal_length", "sepal_width"]
    rows = [dict(zip(IRIS_FEATURES, map(str, x)), species=data.target_names[y]) for x, y in zip(data.data, data.target)]
    write_csv(path, header, [[r[h] for h in header] for r in rows])
    return rows


@pytest.mark.server
def test_models_list_prints_a_table(server, capsys):
    status, out, err = run(capsys, "models", "list", "--url", server.url)
    assert status == 0 and err == ""
    lines = [line.split() for line in out.splitlines()]
    assert lines == [
        ["NAME", "SERVING", "VERSIONS", "TASK", "RUNTIME"],
        ["binary_classifier", "1", "1", "classification", "onnx"],
        ["diabetes_regressor", "1", "1", "regression", "onnx"],
        ["iris_classifier", "1", "1", "classification", "onnx"],
        ["wine_clusters", "1", "1", "clustering", "onnx"],
    ]
    # Columns line up: every cell starts where its header does.
    header = out.splitlines()[0]
    assert all(line.index("classification") == header.index("TASK")
               for line in out.splitlines() if "classification" in line)


@pytest.mark.server
def test_models_list_marks_a_model_that_is_not_serving(degraded_server, capsys):
    status, out, _ = run(capsys, "models", "list", "--url", degraded_server.url)
    assert status == 0
    assert [line.split() for line in out.splitlines()[1:]] == [
        ["ghost_model", "-", "-", "-", "-"],
        ["iris_classifier", "1", "1", "classification", "onnx"],
    ]


@pytest.mark.server
def test_the_url_defaults_to_the_configured_bind(server, capsys, monkeypatch):
    monkeypatch.setenv("MLSERVE_BIND", f"127.0.0.1:{server.port}")
    status, out, _ = run(capsys, "models", "list")
    assert status == 0 and "iris_classifier" in out
    monkeypatch.setenv("MLSERVE_BIND", f"127.0.0.1:{free_port()}")
    status, _, err = run(capsys, "models", "list")
    assert status == 1 and err.startswith("mlserve: connection_failed: cannot reach http://127.0.0.1:")


@pytest.mark.server
def test_models_info_prints_pretty_json(server, client, capsys):
    status, out, _ = run(capsys, "models", "info", "iris_classifier", "--url", server.url)
    assert status == 0
    assert json.loads(out) == client.get_model_info("iris_classifier")
    assert '\n  "features": [\n    "sepal_length",' in out


@pytest.mark.server
def test_predict_with_features_prints_the_response(server, capsys):
    status, out, _ = run(capsys, "predict", "iris_classifier", "--features", "5.1,3.5,1.4,0.2", "--url", server.url)
    assert status == 0
    result = json.loads(out)
    assert result["prediction"] == 0 and result["model_name"] == "iris_classifier"
    assert set(result["probabilities"]) == {"0", "1", "2"}
    assert result["latency_ms"] > 0 and result["client_latency_ms"] > 0


@pytest.mark.server
def test_predict_with_json_by_name_and_options(server, capsys):
    features = json.dumps(dict(zip(IRIS_FEATURES, [7.3, 2.9, 6.3, 1.8])))
    status, out, _ = run(capsys, "predict", "iris_classifier", "--json", features, "--version", "1",
                         "--no-cache", "--url", server.url)
    assert status == 0
    result = json.loads(out)
    assert result["prediction"] == 2 and result["model_version"] == 1
    status, out, _ = run(capsys, "predict", "diabetes_regressor", "--json", json.dumps([0.01] * 10),
                         "--url", server.url)
    assert status == 0 and isinstance(json.loads(out)["prediction"], float)


@pytest.mark.server
def test_predict_errors_are_one_line_and_status_1(server, capsys):
    status, out, err = run(capsys, "predict", "iris_classifier", "--features", "5.1,3.5", "--url", server.url)
    assert (status, out) == (1, "")
    assert err == ("mlserve: invalid_features: features has 2 values; iris_classifier expects 4: "
                   "sepal_length, sepal_width, petal_length, petal_width\n")
    status, _, err = run(capsys, "predict", "no_such_model", "--features", "1", "--url", server.url)
    assert (status, err) == (1, "mlserve: model_not_found: no model named 'no_such_model'\n")
    status, _, err = run(capsys, "predict", "iris_classifier", "--features", "1,2,3,4", "--version", "3",
                         "--url", server.url)
    assert (status, err) == (1, "mlserve: version_not_found: iris_classifier has no loaded version 3\n")


def test_predict_without_a_server_is_one_line_not_a_traceback(capsys):
    port = free_port()
    status, out, err = run(capsys, "predict", "iris_classifier", "--features", "1,2,3,4",
                           "--url", f"http://127.0.0.1:{port}")
    assert (status, out) == (1, "")
    assert err.startswith(f"mlserve: connection_failed: cannot reach http://127.0.0.1:{port}: ")
    assert err.count("\n") == 1 and "Traceback" not in err


@pytest.mark.server
def test_predict_refuses_bad_arguments_before_sending(server, capsys):
    status, _, err = run(capsys, "predict", "iris_classifier", "--features", "5.1,abc", "--url", server.url)
    assert (status, err) == (2, "mlserve: --features: expected comma-separated numbers, got '5.1,abc'\n")
    status, _, err = run(capsys, "predict", "iris_classifier", "--json", "{oops", "--url", server.url)
    assert status == 2 and err.startswith("mlserve: --json: not valid JSON")
    status, _, err = run(capsys, "predict", "iris_classifier", "--features", "1,2,3,4", "--url", "localhost:8080")
    assert status == 2 and err.startswith("mlserve: --url: base_url must be an http:// or https:// URL")
    with pytest.raises(SystemExit) as exited:
        main(["predict", "iris_classifier", "--url", server.url])
    assert exited.value.code == 2
    assert "one of the arguments --features --json is required" in capsys.readouterr().err


@pytest.mark.server
def test_batch_writes_every_row_with_predictions_and_probabilities(server, client, tmp_path, capsys):
    source, target = tmp_path / "iris.csv", tmp_path / "scored.csv"
    rows = iris_csv(source)
    status, out, err = run(capsys, "batch", "iris_classifier", str(source), str(target),
                           "--chunk-size", "40", "--url", server.url)
    assert status == 0 and err == ""
    assert out == f"wrote 150 predictions to {target} (iris_classifier v1)\n"
    output = read_csv(target)
    assert output[0] == ["petal_width", "species", "sepal_length", "petal_length", "sepal_width",
                         "prediction", "p_0", "p_1", "p_2"]
    assert len(output) == 1 + 150
    for given, written in zip(rows, output[1:]):
        # The input columns come back exactly as they were written.
        assert written[:5] == [given[h] for h in output[0][:5]]
        expected = client.predict("iris_classifier", {f: float(given[f]) for f in IRIS_FEATURES})
        assert int(written[5]) == expected["prediction"]
        assert [float(p) for p in written[6:]] == pytest.approx(
            [expected["probabilities"][c] for c in ("0", "1", "2")], abs=1e-6)
    species = {"setosa": "0", "versicolor": "1", "virginica": "2"}
    correct = sum(species[w[1]] == w[5] for w in output[1:])
    assert correct >= 140  # a trained classifier, not noise
    assert not (tmp_path / "scored.csv.part").exists()


@pytest.mark.server
def test_batch_without_header_takes_columns_in_model_order(server, tmp_path, capsys):
    with_header, headerless = tmp_path / "named.csv", tmp_path / "plain.csv"
    rows = iris_csv(with_header)
    write_csv(headerless, None, [[r[f] for f in IRIS_FEATURES] for r in rows])
    status, _, _ = run(capsys, "batch", "iris_classifier", str(with_header), str(tmp_path / "a.csv"),
                       "--url", server.url)
    assert status == 0
    status, out, _ = run(capsys, "batch", "iris_classifier", str(headerless), str(tmp_path / "b.csv"),
                         "--no-header", "--chunk-size", "7", "--url", server.url)
    assert status == 0 and "wrote 150 predictions" in out
    named, plain = read_csv(tmp_path / "a.csv"), read_csv(tmp_path / "b.csv")
    assert plain[0] == IRIS_FEATURES + ["prediction", "p_0", "p_1", "p_2"]
    assert plain[1:] == [[r[f] for f in IRIS_FEATURES] + n[5:] for r, n in zip(rows, named[1:])]


@pytest.mark.server
def test_batch_for_a_regressor_has_no_probability_columns(server, client, tmp_path, capsys):
    data = load_diabetes()
    source, target = tmp_path / "diabetes.csv", tmp_path / "out.csv"
    write_csv(source, DIABETES_FEATURES, data.data[:25].tolist())
    status, _, _ = run(capsys, "batch", "diabetes_regressor", str(source), str(target),
                       "--chunk-size", "10", "--url", server.url)
    assert status == 0
    output = read_csv(target)
    assert output[0] == DIABETES_FEATURES + ["prediction"]
    assert len(output) == 26
    for x, written in zip(data.data[:25].tolist(), output[1:]):
        assert float(written[-1]) == pytest.approx(client.predict("diabetes_regressor", x)["prediction"], rel=1e-6)


@pytest.mark.server
def test_batch_with_only_a_header_writes_only_a_header(server, tmp_path, capsys):
    source, target = tmp_path / "empty.csv", tmp_path / "out.csv"
    write_csv(source, IRIS_FEATURES, [])
    status, out, _ = run(capsys, "batch", "iris_classifier", str(source), str(target), "--url", server.url)
    assert status == 0 and "wrote 0 predictions" in out
    assert read_csv(target) == [IRIS_FEATURES + ["prediction", "p_0", "p_1", "p_2"]]


@pytest.mark.server
def test_batch_refuses_input_it_cannot_send(server, tmp_path, capsys):
    target = tmp_path / "out.csv"
    source = tmp_path / "in.csv"
    write_csv(source, ["sepal_length", "sepal_width", "petal_length"], [["5.1", "3.5", "1.4"]])
    status, _, err = run(capsys, "batch", "iris_classifier", str(source), str(target), "--url", server.url)
    assert (status, err) == (1, f"mlserve: {source}: no column for petal_width; the model expects "
                                "sepal_length, sepal_width, petal_length, petal_width; the file has "
                                "sepal_length, sepal_width, petal_length\n")
    write_csv(source, None, [["5.1", "3.5", "1.4", "0.2"]])
    status, _, err = run(capsys, "batch", "iris_classifier", str(source), str(target), "--url", server.url)
    assert status == 1 and err.endswith("the first row looks like data: use --no-header\n")
    write_csv(source, IRIS_FEATURES, [["5.1", "3.5", "1.4", "0.2"], ["5.1", "n/a", "1.4", "0.2"]])
    status, _, err = run(capsys, "batch", "iris_classifier", str(source), str(target), "--url", server.url)
    assert (status, err) == (1, f"mlserve: {source} line 3, sepal_width: 'n/a' is not a finite number\n")
    write_csv(source, None, [["5.1", "3.5", "1.4"]])
    status, _, err = run(capsys, "batch", "iris_classifier", str(source), str(target), "--no-header",
                         "--url", server.url)
    assert status == 1 and err.startswith(f"mlserve: {source} line 1: 3 values; the model expects 4")
    status, _, err = run(capsys, "batch", "iris_classifier", str(tmp_path / "missing.csv"), str(target),
                         "--url", server.url)
    assert (status, err) == (1, f"mlserve: {tmp_path / 'missing.csv'}: No such file or directory\n")
    assert not target.exists() and list(tmp_path.glob("*.part")) == []


@pytest.mark.server
def test_batch_server_errors_name_the_rows_and_leave_no_output(degraded_server, tmp_path, capsys):
    source, target = tmp_path / "iris.csv", tmp_path / "out.csv"
    iris_csv(source)
    status, _, err = run(capsys, "batch", "iris_classifier", str(source), str(target), "--chunk-size", "5",
                         "--url", degraded_server.url)
    assert status == 0 and len(read_csv(target)) == 151
    target.unlink()
    status, out, err = run(capsys, "batch", "iris_classifier", str(source), str(target), "--chunk-size", "6",
                           "--url", degraded_server.url)
    assert (status, out) == (1, "")
    assert err == (f"mlserve: batch_too_large: features_batch has 6 rows; at most 5 are accepted "
                   f"(data rows 1-6 of {source})\n")
    assert not target.exists() and list(tmp_path.glob("*.part")) == []
    status, _, err = run(capsys, "batch", "no_such_model", str(source), str(target), "--url", degraded_server.url)
    assert (status, err) == (1, "mlserve: model_not_found: no model named 'no_such_model'\n")
    status, _, err = run(capsys, "batch", "ghost_model", str(source), str(target), "--url", degraded_server.url)
    assert (status, err) == (1, "mlserve: model_not_ready: ghost_model is loaded but not serving\n")


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.server
def test_batch_draws_a_progress_bar_on_a_terminal(server, tmp_path, capsys, monkeypatch):
    source = tmp_path / "iris.csv"
    iris_csv(source)
    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    status = main(["batch", "iris_classifier", str(source), str(tmp_path / "out.csv"),
                   "--chunk-size", "50", "--url", server.url])
    assert status == 0
    frames = terminal.getvalue().split("\r")[1:]
    assert [f.split("] ")[1].strip() for f in frames] == [
        "50/150 rows (33%)", "100/150 rows (67%)", "150/150 rows (100%)"]
    assert frames[-1] == "[" + "#" * 30 + "] 150/150 rows (100%)\n"


@pytest.mark.server
def test_batch_rejects_a_chunk_size_below_one(server, tmp_path, capsys):
    with pytest.raises(SystemExit) as exited:
        main(["batch", "iris_classifier", "in.csv", "out.csv", "--chunk-size", "0", "--url", server.url])
    assert exited.value.code == 2
    assert "--chunk-size: expected a number >= 1, got 0" in capsys.readouterr().err


@pytest.mark.server
def test_the_csv_a_model_was_trained_on_is_the_csv_batch_predicts_on(fresh_models, tmp_path, capsys, monkeypatch):
    from sklearn.datasets import load_wine

    from tests.server import Server

    data = load_wine()
    source = tmp_path / "wine.csv"
    # scikit-learn's own column names: "od280/od315_of_diluted_wines", spaces, units.
    write_csv(source, list(data.feature_names) + ["cultivar"],
              [list(map(str, row)) + [str(y)] for row, y in zip(data.data, data.target)])
    monkeypatch.setenv("MLSERVE_MODELS_DIR", str(fresh_models))
    status, out, _ = run(capsys, "train", str(source), "--target", "cultivar", "--name", "wine_kind",
                         "--algorithm", "logistic_regression")
    assert status == 0 and "saved wine_kind v1" in out
    with Server(fresh_models, workers=1) as server:
        target = tmp_path / "out.csv"
        status, out, err = run(capsys, "batch", "wine_kind", str(source), str(target), "--url", server.url)
        assert (status, err) == (0, ""), err
        rows = read_csv(target)
        assert len(rows) == 1 + len(data.data) and rows[0][-4:] == ["prediction", "p_0", "p_1", "p_2"]
        accuracy = sum(int(r[-4]) == int(r[-5]) for r in rows[1:]) / len(data.data)
        assert accuracy > 0.9
