"""The alias follower's own process (app/alias_follower.py does the work).

NOTE: why a process of its own, started by the master, rather than a thread:
a thread in the master would be forked into every worker mid-flight (and
holds the MLflow client's sockets and threads, which fork does not copy
safely); a thread in one elected worker would put MLflow downloads and model
checks on a serving worker's CPU and memory, and die with that worker on
every swap. A separate interpreter imports MLflow only there, costs the
serving processes nothing, and reloads the master the way the CLI does.

The master starts it (when_ready, on_reload) while something is followed and
mlflow.follow_interval is not 0, and stops it when nothing is (or at exit).
It dies with the master (PR_SET_PDEATHSIG), and exits by itself if its
master is gone. Run as: python -m app.server.follower MASTER_PID HOST_ID
"""
from __future__ import annotations

import ctypes
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

log = logging.getLogger("mlserve")
MODULE = "app.server.follower"
PR_SET_PDEATHSIG = 1


class FollowerProcess:
    """The master's handle on the follower process."""

    def __init__(self):
        self.process: subprocess.Popen | None = None

    def ensure(self, service) -> None:
        """Run the follower while something is followed, stop it otherwise."""
        wanted = service.settings.mlflow.follow_interval > 0 and bool(followed(service))
        running = self.process is not None and self.process.poll() is None
        if wanted and not running:
            self.process = subprocess.Popen([sys.executable, "-m", MODULE, str(os.getpid()), service.reloads.host_id],
                                            preexec_fn=die_with_parent, stdin=subprocess.DEVNULL)
            log.info("alias follower started (pid %d)", self.process.pid)
        elif not wanted and running:
            self.stop()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
        self.process = None


def followed(service) -> list:
    from app.alias_follower import follows

    try:
        return follows(service.registry.repository, service.registry.plan)
    except Exception:  # an unreadable repository is the registry's to report
        log.exception("cannot tell which aliases are followed")
        return []


def die_with_parent() -> None:
    # Runs in the child between fork and exec: the kernel sends it SIGTERM
    # when the master dies, however it dies.
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        pass


def main(argv: list[str]) -> int:
    from app import settings as settings_module
    from app.alias_follower import AliasFollower, FollowLoop, Lease
    from app.control import ControlChannel
    from app.lifecycle import Lifecycle
    from app.metrics import Metrics
    from app.mlflow_models import MLflowRegistry
    from app.plan import read_plan
    from app.publishing import Publisher
    from app.reload import ReloadTrigger
    from app.repository import ModelRepository
    from app import logs

    master_pid, host_id = int(argv[0]), argv[1]
    settings = settings_module.load()
    logs.configure(settings.monitoring.log_level)
    logs.quiet_library_warnings()
    repository = ModelRepository(Path(settings.models.directory))
    lifecycle = Lifecycle(repository, settings.models.verify_tolerance,
                          lambda: read_plan(Path(settings.models.config)))
    registry: list[MLflowRegistry] = []

    def mlflow() -> MLflowRegistry:
        if not registry:
            registry.append(MLflowRegistry(settings.mlflow.tracking_uri, settings.mlflow.registry_uri))
        return registry[0]

    def signal_master() -> None:
        os.kill(master_pid, signal.SIGHUP)

    # The reload goes out as any worker's would: this host's master by signal,
    # the other hosts through Redis (this host's workers ignore its own id).
    # Claims are only made for messages received, and this process receives none.
    reloads = ReloadTrigger(ControlChannel(settings.redis.url), host_id, Path(os.devnull), signal_master)
    metrics = Metrics()
    follower = AliasFollower(Publisher(lifecycle), lifecycle, mlflow, by=f"mlflow-follower@{socket.gethostname()}")
    interval = settings.mlflow.follow_interval
    lease = Lease(settings.redis.url, f"{host_id}:{os.getpid()}", ttl=max(30.0, 3 * interval))
    loop = FollowLoop(follower, lease, lambda reason: reloads.request(reason), metrics.alias_checked, interval)
    signal.signal(signal.SIGTERM, lambda *_: loop.stop.set())
    threading.Thread(target=watch_master, args=(master_pid, loop.stop), daemon=True).start()
    log.info("alias follower: checking every %g s", interval)
    loop.run()
    return 0


def watch_master(master_pid: int, stop: threading.Event) -> None:
    """Stop when the master is gone (its pid no longer our parent)."""
    while not stop.wait(1.0):
        if os.getppid() != master_pid:
            stop.set()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
