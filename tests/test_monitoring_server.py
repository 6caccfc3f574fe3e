"""The prediction log and drift in a real 2-worker Gunicorn server: both workers
append to one file and one Redis stream, drift is one host-wide value whichever
worker answers, and a dead Redis costs requests nothing."""
from __future__ import annotations

import json
import threading

import pytest
import requests

from tests.server import Server
from tests.wait import until

ROWS = [[4.3 + (i % 36) / 10, 2.0 + (i % 24) / 10, 1.0 + (i % 59) / 10, 0.1 + (i % 24) / 10] for i in range(400)]


def send_from_many_connections(url: str, rows: list, threads: int = 8) -> list[str]:
    """Each row on a new connection, from several threads, so both workers take some."""
    ids, lock = [], threading.Lock()

    def worker(part):
        for row in part:
            answer = requests.post(url + "/api/v1/predict", json={"model_name": "iris_classifier", "features": row},
                                   headers={"Connection": "close"}, timeout=30)
            assert answer.status_code == 200
            with lock:
                ids.append(answer.headers["X-Request-ID"])
    parts = [rows[i::threads] for i in range(threads)]
    pool = [threading.Thread(target=worker, args=(p,)) for p in parts]
    for t in pool:
        t.start()
    for t in pool:
        t.join(120)
    return ids


@pytest.mark.server
def test_both_workers_log_to_one_file_and_stream_and_drift_is_summed_over_them(demo_models, redis_server, tmp_path):
    log = tmp_path / "predictions.jsonl"
    env = {"MLSERVE_DRIFT_ENABLED": "true", "MLSERVE_PREDICTION_LOG_FILE": str(log), "MLSERVE_REDIS_URL": redis_server.url,
           "MLSERVE_PREDICTION_LOG_REDIS_STREAM": "mlserve:predictions", "MLSERVE_PREDICTION_LOG_REDIS_MAXLEN": "100000"}
    with Server(demo_models, workers=2, env=env) as server:
        ids = send_from_many_connections(server.url, ROWS)
        assert len(set(ids)) == len(ROWS)  # every id is unique, across both workers
        records = until(lambda: log.exists() and len(found := [json.loads(x) for x in open(log)]) == len(ROWS) and found,
                        30, what="every prediction in the file")
        assert {r["request_id"] for r in records} == set(ids)
        workers = {r["worker"] for r in records}
        assert workers <= set(server.worker_pids()) and len(workers) == 2, workers
        stream = until(lambda: (entries := redis_server.client().xrange("mlserve:predictions")) and
                       len(entries) == len(ROWS) and entries, 30, what="every prediction in the stream")
        assert {json.loads(fields[b"record"])["request_id"] for _, fields in stream} == set(ids)

        # Whichever worker answers (a new connection each time), the window holds every row of the host.
        for _ in range(10):
            found = requests.get(server.url + "/api/v1/models/iris_classifier/drift",
                                 headers={"Connection": "close"}, timeout=10).json()
            assert found["window"]["rows"] == len(ROWS)
        metrics = requests.get(server.url + "/metrics", timeout=10).text
        rows_lines = [x for x in metrics.splitlines() if x.startswith('mlserve_drift_window_rows{model="iris_classifier"')]
        assert rows_lines == [f'mlserve_drift_window_rows{{model="iris_classifier",version="1"}} {float(len(ROWS))}']
        assert len([x for x in metrics.splitlines() if x.startswith("mlserve_feature_psi{")
                    and 'model="iris_classifier"' in x]) == 4  # one per feature, not one per worker


@pytest.mark.server
def test_a_redis_that_dies_drops_stream_records_and_no_request(demo_models, redis_server, tmp_path):
    env = {"MLSERVE_REDIS_URL": redis_server.url, "MLSERVE_PREDICTION_LOG_REDIS_STREAM": "mlserve:predictions",
           "MLSERVE_PREDICTION_LOG_SINK_BUFFER_BYTES": "4096"}
    with Server(demo_models, workers=1, env=env) as server:
        session = requests.Session()
        assert session.post(server.url + "/api/v1/predict", json={"model_name": "iris_classifier",
                                                                  "features": ROWS[0]}).status_code == 200
        until(lambda: redis_server.client().xlen("mlserve:predictions") == 1, 30, what="the first record")
        redis_server.stop()
        for row in ROWS:
            assert session.post(server.url + "/api/v1/predict", timeout=5,
                                json={"model_name": "iris_classifier", "features": row}).status_code == 200

        def dropped():
            text = session.get(server.url + "/metrics").text
            return sum(float(x.rsplit(" ", 1)[1]) for x in text.splitlines()
                       if x.startswith('mlserve_prediction_log_dropped_total{') and 'sink="redis"' in x)
        until(lambda: dropped() > 0, 30, what="stream records dropped and counted")
        assert session.get(server.url + "/ready").status_code == 200
