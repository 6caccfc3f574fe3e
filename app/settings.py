"""Every setting, declared once: type, default, allowed values, one-line doc.

Values come from the YAML file named by MLSERVE_CONFIG (default
config/server.yaml), then from MLSERVE_<SECTION>_<NAME> environment variables,
then from the short forms (MLSERVE_BIND, MLSERVE_WORKERS, ...). This is the only
module that reads the environment.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import yaml

ENV_PREFIX = "MLSERVE_"
DEFAULT_CONFIG = "config/server.yaml"


class SettingError(ValueError):
    """A setting has a value that is not allowed; the message is one line."""


def setting(default: Any, doc: str, check: Callable[[Any], str | None] | None = None, *,
            gunicorn: str | None = None, to_gunicorn: Callable[[Any], Any] | None = None):
    """A setting's declaration. gunicorn names the Gunicorn setting it feeds (to_gunicorn
    converts the value), so gunicorn.conf.py and the benchmarks map it the same way."""
    return field(default=default, metadata={"doc": doc, "check": check, "gunicorn": gunicorn,
                                            "to_gunicorn": to_gunicorn})


def at_least(low: float) -> Callable[[Any], str | None]:
    return lambda v: None if v >= low else f"a number >= {low}"


def between(low: float, high: float) -> Callable[[Any], str | None]:
    return lambda v: None if low <= v <= high else f"a number from {low} to {high}"


def http_url(v: str) -> str | None:
    return None if v == "" or v.startswith(("http://", "https://")) else "empty (off) or an http:// or https:// URL"


def one_of(*choices: str) -> Callable[[Any], str | None]:
    return lambda v: None if v in choices else "one of " + ", ".join(choices)


def redis_url(v: str) -> str | None:
    if v == "" or v.startswith(("redis://", "rediss://", "unix://")):
        return None
    return "empty (no Redis) or a redis://, rediss:// or unix:// URL"


MEINHELD_WORKER = "app.server.worker.MeinheldWorker"


def worker_class_path(name: str) -> str:
    # meinheld is an optional C extension: without it, gthread serves.
    return MEINHELD_WORKER if name == "meinheld" and importlib.util.find_spec("meinheld") else "gthread"


@dataclass(frozen=True)
class Server:
    host: str = setting("127.0.0.1", "Address to listen on.")
    port: int = setting(8080, "TCP port to listen on.", between(0, 65535))
    workers: int = setting(2, "Worker processes (one per core is right for CPU-bound models).", between(1, 256),
                           gunicorn="workers")
    worker_class: str = setting("meinheld", "meinheld (C event loop) or gthread (threads; used when meinheld is missing).",
                                one_of("meinheld", "gthread"), gunicorn="worker_class", to_gunicorn=worker_class_path)
    threads: int = setting(4, "Threads per worker with worker_class gthread.", between(1, 256), gunicorn="threads")
    worker_connections: int = setting(1000, "Most simultaneous connections per worker.", between(1, 100000),
                                      gunicorn="worker_connections")
    timeout: int = setting(30, "Seconds a worker may be silent before the master restarts it.", between(1, 3600),
                           gunicorn="timeout")
    graceful_timeout: int = setting(30, "Seconds in-flight requests get to finish on SIGTERM.", between(0, 3600),
                                    gunicorn="graceful_timeout")
    keepalive: int = setting(60, "Seconds an idle keep-alive connection is held open.", between(0, 3600),
                             gunicorn="keepalive")
    max_requests: int = setting(0, "Restart a worker after this many requests (0: never).", at_least(0),
                                gunicorn="max_requests")
    max_requests_jitter: int = setting(0, "Random extra requests added to max_requests per worker.", at_least(0),
                                       gunicorn="max_requests_jitter")
    max_body_bytes: int = setting(1_048_576, "Largest request body accepted; larger gets 413.", between(64, 1 << 30))
    max_batch_rows: int = setting(10_000, "Most rows in one batch_predict; more gets 413.", between(1, 10_000_000))
    request_timeout_ms: int = setting(10_000, "Milliseconds a request may take before it is answered 504 (clients may "
                                      "ask for less with X-Request-Timeout; 0: no deadline).", between(0, 3_600_000))
    allow_unknown_fields: bool = setting(False, "Accept request fields the API does not know (clients that add their "
                                         "own metadata); off: 422 naming the field.")
    cors_origins: str = setting("", "Comma-separated origins allowed by CORS ('*' for any; empty: CORS off).")
    pid_file: str = setting("", "Where the master writes its pid, read by the CLI to signal it (empty: <tmp>/mlserve-<port>.pid).")
    admin_token: str = setting("", "Bearer token for /api/v1/admin/* and the other admin calls (an admin key in "
                                   "effect; empty: only admin keys, and with keys off the admin API is off).")


@dataclass(frozen=True)
class Redis:
    url: str = setting("", "Redis URL for the shared cache and control channel; empty: no Redis.", redis_url)
    cache_ttl: int = setting(300, "Seconds a cached prediction lives in Redis.", between(1, 86400 * 30))
    connect_timeout: float = setting(0.05, "Seconds to wait for a Redis connection.", between(0.001, 30))
    socket_timeout: float = setting(0.05, "Seconds to wait for a Redis reply.", between(0.001, 30))
    pool_size: int = setting(16, "Most Redis connections per worker.", between(1, 10000))


@dataclass(frozen=True)
class Cache:
    enabled: bool = setting(True, "Cache predictions (requests may still opt out with use_cache: false).")
    l1_max_entries: int = setting(1_000_000, "Most predictions held in each worker's in-process cache (0: no L1).",
                                  at_least(0))
    l1_max_bytes: int = setting(32 << 20, "Most memory each worker's in-process cache may hold, counted as the "
                                "worker holds it (keys, values, entries, table).", at_least(0))
    l1_ttl: float = setting(60.0, "Seconds a prediction lives in the in-process cache.", between(0.001, 86400 * 30))
    l2_enabled: bool = setting(True, "Use Redis (redis.url) as a shared second level.")
    breaker_failures: int = setting(5, "Consecutive Redis failures that open the circuit breaker.", between(1, 1000))
    breaker_reset: float = setting(5.0, "Seconds Redis is left alone once the breaker opens.", between(0.01, 3600))


@dataclass(frozen=True)
class Models:
    directory: str = setting("models", "The model repository: <directory>/<name>/<version>/.")
    config: str = setting("config/models.yaml", "Which models (and pinned versions) to serve.")
    verify_tolerance: float = setting(1e-5, "Largest probability difference accepted between ONNX and scikit-learn.", between(0, 1))
    reconvert: bool = setting(False, "Convert to ONNX again, at load, the versions whose conversion failed when they "
                                     "were published (after an upgrade of skl2onnx, say).")
    max_upload_bytes: int = setting(1 << 30, "Largest artifact accepted by the upload endpoint (/api/v1/admin/uploads).",
                                    between(1, 1 << 40))


@dataclass(frozen=True)
class Mlflow:
    tracking_uri: str = setting("", "MLflow tracking server for models:/ URIs and followed aliases (empty: MLFLOW_TRACKING_URI).")
    registry_uri: str = setting("", "MLflow model registry, when it is not the tracking server (empty: MLFLOW_REGISTRY_URI).")
    follow_interval: float = setting(30.0, "Seconds between checks of the MLflow aliases models follow (0: follow none).",
                                     between(0, 86400))


@dataclass(frozen=True)
class Monitoring:
    prometheus_enabled: bool = setting(True, "Serve /metrics.")
    metrics_dir: str = setting("", "Directory for per-worker metric files (empty: a fresh temporary one).")
    log_level: str = setting("info", "Log level.", one_of("debug", "info", "warning", "error"), gunicorn="loglevel")
    access_log: bool = setting(False, "Log every request (costs throughput).", gunicorn="accesslog",
                               to_gunicorn=lambda on: "-" if on else None)


@dataclass(frozen=True)
class RateLimiting:
    enabled: bool = setting(False, "Limit requests per API key (per client address when keys are off).")
    requests_per_second: int = setting(1000, "Sustained requests per second per key or address.", between(1, 10_000_000))
    burst: int = setting(2000, "Requests a key or address may make at once before 429.", between(1, 10_000_000))


@dataclass(frozen=True)
class Security:
    api_keys: bool = setting(False, "Require an API key (Authorization: Bearer, or X-API-Key) on every endpoint but "
                                    "the health probes.")
    keys_file: str = setting("", "The hashed API keys (empty: <models.directory>/.api-keys.json).")


@dataclass(frozen=True)
class Cli:
    url: str = setting("", "The server mlserve commands talk to (empty: http://server.host:server.port).", http_url)
    api_key: str = setting("", "The key mlserve commands and the client send (Authorization: Bearer).")


@dataclass(frozen=True)
class PredictionLog:
    sample_rate: float = setting(1.0, "Share of requests whose predictions the sinks record (errors are always "
                                      "recorded; drift counts every row).", between(0, 1))
    file: str = setting("", "JSON Lines file every worker appends records to (empty: no file sink).")
    file_max_bytes: int = setting(100 << 20, "Size at which the file is rotated to FILE.1, FILE.2, ...", at_least(4096))
    file_backups: int = setting(5, "Rotated files kept.", between(1, 1000))
    redis_stream: str = setting("", "Redis stream on redis.url that records are added to (empty: no stream sink).")
    redis_maxlen: int = setting(1_000_000, "Length the stream is trimmed to, approximately (XADD MAXLEN ~).", at_least(1))
    http_url: str = setting("", "URL that receives CloudEvents in KServe's logger format (empty: no HTTP sink).", http_url)
    http_timeout: float = setting(1.0, "Seconds to wait for the HTTP sink to answer an event.", between(0.01, 60))
    queue_rows: int = setting(10_000, "Most rows waiting in each worker's queue; beyond, the oldest are dropped.",
                              between(1, 10_000_000))
    sink_buffer_bytes: int = setting(8 << 20, "Most bytes of records waiting for each sink in each worker.",
                                     between(1024, 1 << 34))
    flush_seconds: float = setting(0.2, "Longest a record waits in a worker before it is handed to its sinks.",
                                   between(0.001, 60))


@dataclass(frozen=True)
class Drift:
    enabled: bool = setting(False, "Count served rows per model version and feature against a reference; export PSI.")
    window_seconds: float = setting(3600.0, "Served rows older than this leave the drift window.", between(1, 86400 * 30))
    window_buckets: int = setting(12, "Time buckets the window slides by.", between(1, 1000))
    window_rows: int = setting(0, "Most rows in the window, newest buckets first (0: no limit).", at_least(0))
    baseline_rows: int = setting(1000, "Rows served first that become the reference of a version stored without one.",
                                 between(10, 1_000_000))
    min_rows: int = setting(100, "Rows the window needs before PSI is reported.", at_least(1))
    warn_threshold: float = setting(0.1, "PSI from which a feature is warn.", between(0, 100))
    drift_threshold: float = setting(0.25, "PSI from which a feature is drift.", between(0, 100))
    epsilon: float = setting(1e-4, "Fraction an empty bin counts as, so PSI stays finite.", between(1e-12, 0.1))


@dataclass(frozen=True)
class Settings:
    server: Server = field(default_factory=Server)
    redis: Redis = field(default_factory=Redis)
    cache: Cache = field(default_factory=Cache)
    models: Models = field(default_factory=Models)
    monitoring: Monitoring = field(default_factory=Monitoring)
    rate_limiting: RateLimiting = field(default_factory=RateLimiting)
    security: Security = field(default_factory=Security)
    prediction_log: PredictionLog = field(default_factory=PredictionLog)
    drift: Drift = field(default_factory=Drift)
    cli: Cli = field(default_factory=Cli)
    mlflow: Mlflow = field(default_factory=Mlflow)

    @property
    def bind(self) -> str:
        return f"{self.server.host}:{self.server.port}"

    @property
    def keys_path(self) -> str:
        return self.security.keys_file or os.path.join(self.models.directory, ".api-keys.json")

    @property
    def pid_path(self) -> str:
        return self.server.pid_file or os.path.join(tempfile.gettempdir(), f"mlserve-{self.server.port}.pid")


SECTION_CLASSES = {"server": Server, "redis": Redis, "cache": Cache, "models": Models,
                   "monitoring": Monitoring, "rate_limiting": RateLimiting, "security": Security, "prediction_log": PredictionLog,
                   "drift": Drift, "mlflow": Mlflow, "cli": Cli}

# Short environment names for the settings people change most.
SHORT_FORMS = {
    "MLSERVE_WORKERS": ("server", "workers"),
    "MLSERVE_MODELS_DIR": ("models", "directory"),
    "MLSERVE_REDIS_URL": ("redis", "url"),
    "MLSERVE_URL": ("cli", "url"),
    "MLSERVE_API_KEY": ("cli", "api_key"),
}
# MLflow's own variables, as every MLflow client reads them; MLSERVE_MLFLOW_* win.
MLFLOW_FORMS = {
    "MLFLOW_TRACKING_URI": ("mlflow", "tracking_uri"),
    "MLFLOW_REGISTRY_URI": ("mlflow", "registry_uri"),
}


def load(environ: Mapping[str, str] | None = None, path: str | None = None) -> Settings:
    """Settings from file, then environment; SettingError on any bad value."""
    environ = os.environ if environ is None else environ
    path = path or environ.get(ENV_PREFIX + "CONFIG") or DEFAULT_CONFIG
    raw = read_file(Path(path), required=ENV_PREFIX + "CONFIG" in environ)
    check_environment_names(environ)
    for env, (section, name) in MLFLOW_FORMS.items():
        if environ.get(env):
            raw.setdefault(section, {})[name] = environ[env]
    for section, cls in SECTION_CLASSES.items():
        for f in dataclasses.fields(cls):
            env = f"{ENV_PREFIX}{section.upper()}_{f.name.upper()}"
            if env in environ:
                raw.setdefault(section, {})[f.name] = environ[env]
    for env, (section, name) in SHORT_FORMS.items():
        if env in environ:
            raw.setdefault(section, {})[name] = environ[env]
    if ENV_PREFIX + "BIND" in environ:
        host, port = split_bind(environ[ENV_PREFIX + "BIND"])
        raw.setdefault("server", {}).update(host=host, port=port)
    extra = sorted(raw.keys() - SECTION_CLASSES.keys())
    if extra:
        raise SettingError(f"{extra[0]}: unknown section; allowed: {', '.join(SECTION_CLASSES)}")
    return Settings(**{s: build_section(s, raw.get(s) or {}) for s in SECTION_CLASSES})


def check_environment_names(environ: Mapping[str, str]) -> None:
    """A misspelt MLSERVE_ variable would silently do nothing: refuse it."""
    known = {ENV_PREFIX + "CONFIG", ENV_PREFIX + "BIND", *SHORT_FORMS}
    known.update(f"{ENV_PREFIX}{section.upper()}_{f.name.upper()}"
                 for section, cls in SECTION_CLASSES.items() for f in dataclasses.fields(cls))
    for name in sorted(environ):
        if name.startswith(ENV_PREFIX) and name not in known:
            raise SettingError(f"{name}: unknown setting; see the settings table in README.md")


def read_file(path: Path, required: bool) -> dict:
    if not path.exists():
        if required:
            raise SettingError(f"MLSERVE_CONFIG={path}: no such file")
        return {}
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise SettingError(f"{path}: not valid YAML{where}: {problem}") from None
    except (OSError, UnicodeDecodeError) as exc:
        label = f"{ENV_PREFIX}CONFIG={path}" if required else str(path)
        raise SettingError(f"{label}: cannot read the config file ({exc.__class__.__name__}: {exc})") from None
    if not isinstance(data, dict):
        raise SettingError(f"{path}: expected a mapping of sections, got {type(data).__name__}")
    return {k: dict(v or {}) if isinstance(v, dict) or v is None else bad_section(k, v) for k, v in data.items()}


def bad_section(name: str, value: Any):
    raise SettingError(f"{name}: expected a mapping of settings, got {value!r}")


def split_bind(value: str) -> tuple[str, str]:
    host, sep, port = value.rpartition(":")
    if not sep or not host:
        raise SettingError(f"MLSERVE_BIND={value!r}: expected HOST:PORT")
    return host.strip("[]"), port


def build_section(section: str, values: dict):
    cls = SECTION_CLASSES[section]
    known = {f.name: f for f in dataclasses.fields(cls)}
    for name in values:
        if name not in known:
            raise SettingError(f"{section}.{name}: unknown setting; allowed: {', '.join(known)}")
    return cls(**{name: convert(section, known[name], value) for name, value in values.items()})


def convert(section: str, f: dataclasses.Field, value: Any) -> Any:
    kind = type(f.default)
    label = f"{section}.{f.name}={value!r}"
    try:
        result = coerce(kind, value)
    except (TypeError, ValueError):
        raise SettingError(f"{label}: expected {kind.__name__}") from None
    problem = f.metadata["check"](result) if f.metadata["check"] else None
    if problem:
        raise SettingError(f"{label}: expected {problem}")
    return result


def coerce(kind: type, value: Any) -> Any:
    if kind is bool:
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in ("1", "true", "yes", "on"):
            return True
        if text in ("0", "false", "no", "off"):
            return False
        raise ValueError(value)
    if kind is int:
        if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
            raise ValueError(value)
        return int(str(value).strip()) if isinstance(value, str) else int(value)
    if kind is float:
        if isinstance(value, bool):
            raise ValueError(value)
        return float(value)
    if value is None:
        return ""
    if not isinstance(value, (str, int, float)):
        raise TypeError(value)
    return str(value)


def gunicorn_options(settings: Settings) -> dict[str, Any]:
    """The Gunicorn settings these settings make, by Gunicorn's names."""
    # NOTE: no Gunicorn pidfile: Gunicorn writes it before it listens and leaves
    # it behind when it cannot; app/server/runtime.py writes ours once listening.
    options: dict[str, Any] = {"bind": [settings.bind]}
    for section in SECTION_CLASSES:
        values = getattr(settings, section)
        for f in dataclasses.fields(values):
            name, convert = f.metadata["gunicorn"], f.metadata["to_gunicorn"]
            if name:
                value = getattr(values, f.name)
                options[name] = convert(value) if convert else value
    if options["worker_class"] != "gthread":
        del options["threads"]  # Gunicorn turns a threaded sync worker into gthread
    return options


def describe() -> list[tuple[str, str, Any, str]]:
    """(env name, yaml key, default, doc) for every setting, for docs and --help."""
    rows = []
    for section, cls in SECTION_CLASSES.items():
        for f in dataclasses.fields(cls):
            rows.append((f"{ENV_PREFIX}{section.upper()}_{f.name.upper()}",
                         f"{section}.{f.name}", f.default, f.metadata["doc"]))
    return rows
