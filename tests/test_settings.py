"""app/settings.py: defaults, the YAML file, MLSERVE_* overrides and short
forms, and a one-line SettingError for every kind of bad value."""
from __future__ import annotations

import json
import os
import re
import subprocess
import time

import pytest
import yaml

from app import settings as settings_module
from app.settings import Settings, SettingError, load
from tests.server import GUNICORN, ROOT


@pytest.fixture
def absent(tmp_path) -> str:
    return str(tmp_path / "absent.yaml")


@pytest.fixture
def config_file(tmp_path):
    def write(text: str | bytes) -> str:
        path = tmp_path / "server.yaml"
        path.write_bytes(text if isinstance(text, bytes) else text.encode())
        return str(path)
    return write


# --- defaults -----------------------------------------------------------------

def test_defaults_without_file_or_environment(absent):
    settings = load(environ={}, path=absent)
    assert settings == Settings()
    assert settings.server.host == "127.0.0.1" and settings.server.port == 8080
    assert settings.bind == "127.0.0.1:8080"
    assert settings.server.workers == 2
    assert settings.server.worker_class == "meinheld"
    assert settings.server.max_body_bytes == 1 << 20
    assert settings.server.max_batch_rows == 10_000
    assert settings.server.cors_origins == ""
    assert settings.redis.url == ""
    assert settings.models.directory == "models"
    assert settings.models.config == "config/models.yaml"
    assert settings.monitoring.prometheus_enabled is True
    assert settings.monitoring.access_log is False
    assert settings.monitoring.log_level == "info"
    assert settings.rate_limiting.enabled is False


def test_the_shipped_config_file_loads(monkeypatch):
    monkeypatch.chdir(ROOT)
    shipped = yaml.safe_load((ROOT / "config" / "server.yaml").read_text())
    settings = load(environ={})
    assert settings.server.port == shipped["server"]["port"]
    assert settings.server.workers == shipped["server"]["workers"]
    assert settings.rate_limiting.burst == shipped["rate_limiting"]["burst"]


def test_every_setting_is_described():
    rows = settings_module.describe()
    envs = [env for env, _, _, _ in rows]
    assert "MLSERVE_SERVER_WORKERS" in envs and "MLSERVE_REDIS_URL" in envs
    assert len(envs) == len(set(envs))
    assert all(doc for _, _, _, doc in rows)


# --- the YAML file ----------------------------------------------------------------

def test_yaml_file_values(config_file):
    path = config_file("""
server:
  host: 0.0.0.0
  port: 9001
  workers: 8
  worker_class: gthread
  cors_origins: "*"
redis:
  url: redis://cache.internal:6379/2
  connect_timeout: 0.5
monitoring:
  prometheus_enabled: no
  access_log: yes
  log_level: warning
rate_limiting:
  enabled: true
  burst: 50
""")
    settings = load(environ={}, path=path)
    assert settings.bind == "0.0.0.0:9001"
    assert settings.server.workers == 8 and settings.server.worker_class == "gthread"
    assert settings.server.cors_origins == "*"
    assert settings.redis.url == "redis://cache.internal:6379/2"
    assert settings.redis.connect_timeout == 0.5
    assert settings.monitoring.prometheus_enabled is False
    assert settings.monitoring.access_log is True
    assert settings.monitoring.log_level == "warning"
    assert settings.rate_limiting.enabled is True and settings.rate_limiting.burst == 50
    # Whatever the file leaves out keeps its default.
    assert settings.server.timeout == Settings().server.timeout
    assert settings.rate_limiting.requests_per_second == Settings().rate_limiting.requests_per_second
    assert settings.models == Settings().models


def test_yaml_empty_file_and_empty_sections(config_file):
    assert load(environ={}, path=config_file("")) == Settings()
    assert load(environ={}, path=config_file("server:\nredis:\n")) == Settings()


def test_config_file_named_by_mlserve_config(config_file):
    path = config_file("server:\n  port: 9100\n")
    assert load(environ={"MLSERVE_CONFIG": path}).server.port == 9100


# --- environment overrides ----------------------------------------------------------

def test_environment_overrides_the_file(config_file):
    path = config_file("server:\n  workers: 3\n  port: 9001\nmonitoring:\n  access_log: true\n")
    settings = load(environ={"MLSERVE_SERVER_WORKERS": "5", "MLSERVE_MONITORING_ACCESS_LOG": "off"}, path=path)
    assert settings.server.workers == 5
    assert settings.monitoring.access_log is False
    assert settings.server.port == 9001


@pytest.mark.parametrize("env, value, section, name, expected", [
    ("MLSERVE_SERVER_PORT", "9200", "server", "port", 9200),
    ("MLSERVE_SERVER_TIMEOUT", " 45 ", "server", "timeout", 45),
    ("MLSERVE_SERVER_WORKER_CLASS", "gthread", "server", "worker_class", "gthread"),
    ("MLSERVE_SERVER_MAX_BODY_BYTES", "4096", "server", "max_body_bytes", 4096),
    ("MLSERVE_SERVER_CORS_ORIGINS", "https://a.example", "server", "cors_origins", "https://a.example"),
    ("MLSERVE_REDIS_SOCKET_TIMEOUT", "0.25", "redis", "socket_timeout", 0.25),
    ("MLSERVE_MODELS_CONFIG", "/etc/mlserve/models.yaml", "models", "config", "/etc/mlserve/models.yaml"),
    ("MLSERVE_MODELS_VERIFY_TOLERANCE", "1e-4", "models", "verify_tolerance", 1e-4),
    ("MLSERVE_MONITORING_PROMETHEUS_ENABLED", "false", "monitoring", "prometheus_enabled", False),
    ("MLSERVE_MONITORING_ACCESS_LOG", "1", "monitoring", "access_log", True),
    ("MLSERVE_MONITORING_ACCESS_LOG", "YES", "monitoring", "access_log", True),
    ("MLSERVE_MONITORING_ACCESS_LOG", "on", "monitoring", "access_log", True),
    ("MLSERVE_MONITORING_PROMETHEUS_ENABLED", "0", "monitoring", "prometheus_enabled", False),
    ("MLSERVE_MONITORING_LOG_LEVEL", "debug", "monitoring", "log_level", "debug"),
    ("MLSERVE_RATE_LIMITING_ENABLED", "true", "rate_limiting", "enabled", True),
    ("MLSERVE_RATE_LIMITING_REQUESTS_PER_SECOND", "1", "rate_limiting", "requests_per_second", 1),
])
def test_section_name_overrides(absent, env, value, section, name, expected):
    settings = load(environ={env: value}, path=absent)
    assert getattr(getattr(settings, section), name) == expected


def test_short_forms(absent):
    settings = load(environ={"MLSERVE_BIND": "0.0.0.0:9300", "MLSERVE_WORKERS": "6",
                             "MLSERVE_MODELS_DIR": "/srv/models", "MLSERVE_REDIS_URL": "redis://10.0.0.5:6379/1"},
                    path=absent)
    assert settings.server.host == "0.0.0.0" and settings.server.port == 9300
    assert settings.bind == "0.0.0.0:9300"
    assert settings.server.workers == 6
    assert settings.models.directory == "/srv/models"
    assert settings.redis.url == "redis://10.0.0.5:6379/1"


def test_bind_ipv6(absent):
    settings = load(environ={"MLSERVE_BIND": "[::1]:9400"}, path=absent)
    assert settings.server.host == "::1" and settings.server.port == 9400


def test_short_forms_win_over_long_forms_and_the_file(config_file):
    path = config_file("server:\n  workers: 3\n  port: 9001\n")
    settings = load(environ={"MLSERVE_SERVER_WORKERS": "4", "MLSERVE_WORKERS": "9",
                             "MLSERVE_SERVER_PORT": "9002", "MLSERVE_BIND": "127.0.0.1:9003",
                             "MLSERVE_MODELS_DIRECTORY": "/a", "MLSERVE_MODELS_DIR": "/b"}, path=path)
    assert settings.server.workers == 9
    assert settings.server.port == 9003
    assert settings.models.directory == "/b"


def test_mlserve_config_short_form_with_overrides(config_file):
    path = config_file("server:\n  workers: 3\nredis:\n  url: redis://a:6379/0\n")
    settings = load(environ={"MLSERVE_CONFIG": path, "MLSERVE_REDIS_URL": "rediss://b:6380/0"})
    assert settings.server.workers == 3
    assert settings.redis.url == "rediss://b:6380/0"


def test_redis_url_forms(absent):
    for url in ("", "redis://localhost:6379/0", "rediss://user:pw@host:6380/1", "unix:///run/redis.sock"):
        assert load(environ={"MLSERVE_REDIS_URL": url}, path=absent).redis.url == url


# --- bad values -----------------------------------------------------------------------

def refusal(**kwargs) -> str:
    with pytest.raises(SettingError) as info:
        load(**kwargs)
    message = str(info.value)
    assert message and "\n" not in message, repr(message)
    return message


@pytest.mark.parametrize("env, fragments", [
    # bad int
    ({"MLSERVE_SERVER_WORKERS": "four"}, ["server.workers", "'four'", "expected int"]),
    ({"MLSERVE_SERVER_PORT": "80.5"}, ["server.port", "'80.5'", "expected int"]),
    ({"MLSERVE_WORKERS": ""}, ["server.workers", "''", "expected int"]),
    # out of range
    ({"MLSERVE_SERVER_WORKERS": "0"}, ["server.workers", "'0'", "from 1 to 256"]),
    ({"MLSERVE_WORKERS": "1000"}, ["server.workers", "'1000'", "from 1 to 256"]),
    ({"MLSERVE_SERVER_PORT": "70000"}, ["server.port", "'70000'", "from 0 to 65535"]),
    ({"MLSERVE_SERVER_MAX_BODY_BYTES": "10"}, ["server.max_body_bytes", "'10'", "from 64 to"]),
    ({"MLSERVE_SERVER_MAX_REQUESTS": "-1"}, ["server.max_requests", "'-1'", ">= 0"]),
    ({"MLSERVE_MODELS_VERIFY_TOLERANCE": "nan"}, ["models.verify_tolerance", "'nan'", "from 0 to 1"]),
    ({"MLSERVE_RATE_LIMITING_BURST": "0"}, ["rate_limiting.burst", "'0'", "from 1 to"]),
    # bad float
    ({"MLSERVE_REDIS_CONNECT_TIMEOUT": "fast"}, ["redis.connect_timeout", "'fast'", "expected float"]),
    # bad choice
    ({"MLSERVE_SERVER_WORKER_CLASS": "uwsgi"}, ["server.worker_class", "'uwsgi'", "one of meinheld, gthread"]),
    ({"MLSERVE_MONITORING_LOG_LEVEL": "verbose"},
     ["monitoring.log_level", "'verbose'", "one of debug, info, warning, error"]),
    # bad bool
    ({"MLSERVE_MONITORING_ACCESS_LOG": "maybe"}, ["monitoring.access_log", "'maybe'", "expected bool"]),
    ({"MLSERVE_RATE_LIMITING_ENABLED": "2"}, ["rate_limiting.enabled", "'2'", "expected bool"]),
    # bad redis url
    ({"MLSERVE_REDIS_URL": "http://localhost:6379"},
     ["redis.url", "'http://localhost:6379'", "redis://, rediss:// or unix://"]),
    ({"MLSERVE_REDIS_URL": "localhost:6379"},
     ["redis.url", "'localhost:6379'", "redis://"]),
    # bad bind
    ({"MLSERVE_BIND": "localhost"}, ["MLSERVE_BIND", "'localhost'", "HOST:PORT"]),
    ({"MLSERVE_BIND": ":8080"}, ["MLSERVE_BIND", "':8080'", "HOST:PORT"]),
    ({"MLSERVE_BIND": "127.0.0.1:http"}, ["server.port", "'http'", "expected int"]),
    # a newline in the value stays on one line
    ({"MLSERVE_SERVER_WORKERS": "2\n3"}, ["server.workers", "'2\\n3'", "expected int"]),
])
def test_bad_environment_values(absent, env, fragments):
    message = refusal(environ=env, path=absent)
    for fragment in fragments:
        assert fragment in message, (fragment, message)


@pytest.mark.parametrize("text, fragments", [
    ("server:\n  workers: 2.5\n", ["server.workers", "2.5", "expected int"]),
    ("server:\n  workers: true\n", ["server.workers", "True", "expected int"]),
    ("server:\n  workers: 300\n", ["server.workers", "300", "from 1 to 256"]),
    ("server:\n  host: [a, b]\n", ["server.host", "['a', 'b']", "expected str"]),
    ("monitoring:\n  prometheus_enabled: sometimes\n", ["monitoring.prometheus_enabled", "'sometimes'", "expected bool"]),
    ("server:\n  worker_class: sync\n", ["server.worker_class", "'sync'", "one of meinheld, gthread"]),
    ("redis:\n  url: memcached://x\n", ["redis.url", "'memcached://x'", "redis://"]),
])
def test_bad_file_values(config_file, text, fragments):
    message = refusal(environ={}, path=config_file(text))
    for fragment in fragments:
        assert fragment in message, (fragment, message)


def test_unknown_key(config_file):
    message = refusal(environ={}, path=config_file("server:\n  workers: 2\n  wokers: 4\n"))
    assert message.startswith("server.wokers: unknown setting; allowed: ")
    allowed = message.split("allowed: ", 1)[1].split(", ")
    assert "workers" in allowed and "host" in allowed and "max_body_bytes" in allowed


def test_unknown_section(config_file):
    message = refusal(environ={}, path=config_file("sever:\n  workers: 2\n"))
    assert message.startswith("sever: unknown section; allowed: ")
    allowed = message.split("allowed: ", 1)[1].split(", ")
    assert {"server", "redis", "models", "monitoring", "rate_limiting"} <= set(allowed)


def test_section_that_is_not_a_mapping(config_file):
    message = refusal(environ={}, path=config_file("server: 8080\n"))
    assert "server" in message and "8080" in message and "mapping" in message


def test_file_that_is_not_a_mapping(config_file):
    path = config_file("- server\n- redis\n")
    message = refusal(environ={}, path=path)
    assert path in message and "mapping" in message and "list" in message


def test_mlserve_config_missing_file(tmp_path):
    missing = str(tmp_path / "nope" / "server.yaml")
    message = refusal(environ={"MLSERVE_CONFIG": missing})
    assert message == f"MLSERVE_CONFIG={missing}: no such file"


def test_default_config_file_may_be_absent(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert load(environ={}) == Settings()


@pytest.mark.parametrize("text", ["server: [unclosed\n", "server:\n  workers: 2\n\tport: 3\n",
                                  "server:\n  host: \"open\n", "a: b: c\n"])
def test_invalid_yaml(config_file, text):
    path = config_file(text)
    message = refusal(environ={}, path=path)
    assert message.startswith(f"{path}: not valid YAML")


def test_mlserve_config_pointing_at_a_directory(tmp_path):
    message = refusal(environ={"MLSERVE_CONFIG": str(tmp_path)})
    assert "MLSERVE_CONFIG" in message and str(tmp_path) in message


def test_config_file_that_is_not_utf8(config_file):
    path = config_file(b"server:\n  host: \"caf\xe9\"\n")
    message = refusal(environ={}, path=path)
    assert path in message


# --- gunicorn refuses to start on a bad setting ---------------------------------------------

def clean_environment(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("MLSERVE_") and k != "PROMETHEUS_MULTIPROC_DIR"}
    return {**env, **extra}


@pytest.mark.server
@pytest.mark.parametrize("env, fragments", [
    ({"MLSERVE_SERVER_WORKERS": "0"}, ["server.workers", "'0'", "from 1 to 256"]),
    ({"MLSERVE_SERVER_WORKER_CLASS": "uwsgi"}, ["server.worker_class", "'uwsgi'", "meinheld, gthread"]),
])
def test_gunicorn_exits_with_one_line_on_a_bad_setting(env, fragments):
    started = time.monotonic()
    done = subprocess.run([str(GUNICORN), "-c", "gunicorn.conf.py"], cwd=ROOT, env=clean_environment(**env),
                          capture_output=True, text=True, timeout=60)
    assert done.returncode != 0
    assert time.monotonic() - started < 20
    lines = [line for line in (done.stdout + done.stderr).splitlines() if line.strip()]
    assert len(lines) == 1, lines
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    assert "Traceback" not in lines[0]


@pytest.mark.server
def test_gunicorn_exits_with_one_line_when_mlserve_config_is_a_directory(tmp_path):
    done = subprocess.run([str(GUNICORN), "-c", "gunicorn.conf.py"], cwd=ROOT,
                          env=clean_environment(MLSERVE_CONFIG=str(tmp_path)),
                          capture_output=True, text=True, timeout=60)
    assert done.returncode != 0
    lines = [line for line in (done.stdout + done.stderr).splitlines() if line.strip()]
    assert len(lines) == 1, lines
    assert "MLSERVE_CONFIG" in lines[0]


def test_the_readme_lists_every_setting_with_its_default():
    readme = (ROOT / "README.md").read_text()
    for env, key, default, _ in settings_module.describe():
        row = re.search(rf"^\| `{env}` \| `{re.escape(key)}` \| `([^`]*)` \|", readme, re.M)
        assert row, f"{env} is not in the README's settings table"
        shown = row.group(1)
        assert shown == (json.dumps(default) if isinstance(default, (str, bool)) else repr(default)), (env, shown)
