"""The benchmark harness: `make bench` (python -m perf run) and perf/locustfile.py.

A package so Gunicorn can import perf.reference_apps by name."""
