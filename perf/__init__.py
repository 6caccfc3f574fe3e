"""The benchmark harness: `make bench` (perf/run.py) and perf/locustfile.py.

A package so Gunicorn can import perf.reference_apps by name."""
