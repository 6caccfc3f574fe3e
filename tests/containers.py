"""Build and run the project's image (docker/Dockerfile) for the tests.

With a Docker engine (`docker info` answers), docker builds and runs it and
pulls debian:bookworm-slim as anyone would. Without one, podman does: it
builds with chroot isolation and runs containers with runc and cgroupfs on
the host network, and the base image is made locally with debootstrap from
the Debian mirror apt already uses, then imported under the name the
Dockerfile asks for. That base is cached in podman's storage, keyed by the
mirror's Release file, so only the first run pays for it.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from tests.server import ROOT

BASE_IMAGE = "docker.io/library/debian:bookworm-slim"
# Both stages of docker/Dockerfile carry it.
IMAGE_LABEL = "org.opencontainers.image.title=mlserve"
SUITE = "bookworm"
CACHE = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "mlserve"
# Podman's default ulimits are refused in some sandboxes (setrlimit: Operation
# not permitted); the containers here need none.
CONTAINERS_CONF = "[containers]\ndefault_ulimits = []\n"
# Part of the cache key: a change to how the base is made makes a new one.
BASE_RECIPE = "slim-2"
# What debian:bookworm-slim (debuerreotype --slim) leaves out of packages,
# and its apt settings that keep package caches out of image layers.
DPKG_SLIM = """path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/groff/*
path-exclude /usr/share/info/*
path-exclude /usr/share/linda/*
path-exclude /usr/share/lintian/overrides/*
path-exclude /usr/share/locale/*
path-include /usr/share/locale/locale.alias
path-exclude /usr/share/man/*
"""
APT_CLEAN_COMMAND = ("rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb "
                     "/var/cache/apt/*.bin || true")
APT_CLEAN = f"""DPkg::Post-Invoke {{ "{APT_CLEAN_COMMAND}"; }};
APT::Update::Post-Invoke {{ "{APT_CLEAN_COMMAND}"; }};
Dir::Cache::pkgcache "";
Dir::Cache::srcpkgcache "";
"""


class EngineError(RuntimeError):
    pass


@dataclass
class Engine:
    """One container engine's command line."""
    name: str
    argv: list[str]
    env: dict = field(default_factory=dict)
    build_args: list[str] = field(default_factory=list)

    def __call__(self, *args: str, timeout: float = 120, check: bool = True, input: bytes | None = None,
                 stdout=subprocess.PIPE) -> subprocess.CompletedProcess:
        done = subprocess.run([*self.argv, *args], env={**os.environ, **self.env}, input=input, stdout=stdout,
                              stderr=subprocess.PIPE, timeout=timeout)
        if check and done.returncode != 0:
            raise EngineError(f"{self.name} {' '.join(args[:3])} ... exited {done.returncode}:\n"
                              f"{(done.stderr or b'').decode(errors='replace')[-4000:]}")
        return done

    def text(self, *args: str, timeout: float = 120) -> str:
        return self(*args, timeout=timeout).stdout.decode().strip()

    def image_exists(self, ref: str) -> bool:
        return self("image", "inspect", ref, check=False).returncode == 0


def engine() -> Engine:
    """docker where a Docker engine answers, else podman (which must be installed)."""
    if shutil.which("docker"):
        try:
            if subprocess.run(["docker", "info"], capture_output=True, timeout=30).returncode == 0:
                return Engine("docker", ["docker"])
        except subprocess.TimeoutExpired:
            pass
    podman = shutil.which("podman")
    if not podman:
        raise EngineError("no container engine: no Docker engine answers and podman is not installed "
                          "(make test installs podman, runc and debootstrap)")
    CACHE.mkdir(parents=True, exist_ok=True)
    conf = CACHE / "containers.conf"
    if not conf.exists() or conf.read_text() != CONTAINERS_CONF:
        conf.write_text(CONTAINERS_CONF)
    return Engine("podman", [podman, "--runtime", "runc", "--cgroup-manager", "cgroupfs"],
                  env={"CONTAINERS_CONF": str(conf)},
                  build_args=["--pull=never", "--isolation", "chroot", "--format", "docker"])


# --- the base image, for podman ---------------------------------------------

@dataclass
class AptSource:
    uri: str
    suites: list[str]


def apt_sources() -> list[AptSource]:
    """The deb entries of this machine's apt configuration (one-line and deb822)."""
    etc = Path("/etc/apt")
    found = []
    for path in [etc / "sources.list", *sorted((etc / "sources.list.d").glob("*.list"))]:
        if path.is_file():
            found += one_line_sources(path.read_text())
    for path in sorted((etc / "sources.list.d").glob("*.sources")):
        found += deb822_sources(path.read_text())
    return found


def one_line_sources(text: str) -> list[AptSource]:
    found = []
    for line in text.splitlines():
        words = re.sub(r"\[[^]]*\]", "", line.split("#", 1)[0]).split()
        if len(words) >= 3 and words[0] == "deb":
            found.append(AptSource(words[1].rstrip("/"), [words[2]]))
    return found


def deb822_sources(text: str) -> list[AptSource]:
    found = []
    for stanza in re.split(r"\n\s*\n", text):
        fields = {}
        for line in stanza.splitlines():
            if ":" in line and not line.startswith(("#", " ")):
                key, value = line.split(":", 1)
                fields[key.strip().lower()] = value.strip()
        if "deb" in fields.get("types", "").split() and fields.get("enabled", "yes").lower() != "no":
            found += [AptSource(uri.rstrip("/"), fields.get("suites", "").split())
                      for uri in fields.get("uris", "").split()]
    return found


def debian_mirror() -> tuple[str, str | None]:
    """(the mirror apt uses for bookworm, its security archive or None)."""
    sources = apt_sources()
    mirror = next((s.uri for s in sources if SUITE in s.suites), None)
    if mirror is None:
        raise EngineError(f"apt has no source for Debian {SUITE} to build the base image from")
    security = next((s.uri for s in sources if f"{SUITE}-security" in s.suites), None)
    return mirror, security


def release_key(mirror: str) -> str:
    """What the cached base is keyed by: the mirror's Release file, or the date
    when the mirror cannot be read (debootstrap would then fail anyway)."""
    try:
        with urllib.request.urlopen(f"{mirror}/dists/{SUITE}/Release", timeout=20) as response:
            release = response.read()
    except OSError:
        release = datetime.now(timezone.utc).strftime("%Y%m%d").encode()
    return hashlib.sha256(BASE_RECIPE.encode() + b"\n" + release).hexdigest()[:16]


def pip_ca_bundle() -> Path:
    """The CA bundle pip uses here: $PIP_CERT, pip's configured cert, or the system one."""
    candidates = [os.environ.get("PIP_CERT", "")]
    try:
        listed = subprocess.run([str(Path(sys.executable).with_name("pip")), "config", "list"],
                                capture_output=True, text=True, timeout=60).stdout
        candidates += [m.group(1) for m in re.finditer(r"\bcert='([^']+)'", listed)]
    except (OSError, subprocess.TimeoutExpired):
        pass
    candidates.append("/etc/ssl/certs/ca-certificates.crt")
    return next(Path(c) for c in candidates if c and Path(c).is_file())


def ensure_base(podman: Engine, log=print) -> str:
    """Make BASE_IMAGE available to podman; returns the cached base's name."""
    mirror, security = debian_mirror()
    key = release_key(mirror)
    cached = f"localhost/mlserve-base:{SUITE}-{key}"
    if not podman.image_exists(cached):
        log(f"building the {SUITE} base image with debootstrap from {mirror} (cached as {cached})")
        import_base(podman, cached, mirror, security)
    podman("tag", cached, BASE_IMAGE)
    return cached


def remove_old_builds(podman: Engine, base: str) -> None:
    """Earlier builds of the image (untagged once a new one takes the tag: each
    holds its own copy of the virtualenv), then bases no image is built on."""
    podman("image", "prune", "-f", "--filter", f"label={IMAGE_LABEL}", check=False, timeout=600)
    for old in podman.text("images", "--format", "{{.Repository}}:{{.Tag}}", "localhost/mlserve-base").split():
        if old.startswith("localhost/mlserve-base:") and old != base:
            podman("rmi", old, check=False)


def import_base(podman: Engine, ref: str, mirror: str, security: str | None) -> None:
    debootstrap = shutil.which("debootstrap") or "/usr/sbin/debootstrap"
    if not Path(debootstrap).exists():
        raise EngineError("debootstrap is not installed (make test installs it)")
    CACHE.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="rootfs-", dir=CACHE) as tmp:
        rootfs = Path(tmp) / "rootfs"
        done = subprocess.run([debootstrap, "--variant=minbase", SUITE, str(rootfs), mirror],
                              capture_output=True, text=True, timeout=1200)
        if done.returncode != 0:
            raise EngineError(f"debootstrap exited {done.returncode}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
        configure_rootfs(rootfs, mirror, security)
        tar = subprocess.Popen(["tar", "-C", str(rootfs), "--numeric-owner", "-c", "."], stdout=subprocess.PIPE)
        try:
            imported = subprocess.run([*podman.argv, "import", "--change", 'CMD ["bash"]', "-", ref],
                                      stdin=tar.stdout, env={**os.environ, **podman.env}, capture_output=True,
                                      timeout=600)
        finally:
            tar.stdout.close()
            tar.wait()
        if imported.returncode != 0 or tar.returncode != 0:
            raise EngineError(f"podman import failed: {imported.stderr.decode(errors='replace')[-3000:]}")


def configure_rootfs(rootfs: Path, mirror: str, security: str | None) -> None:
    """What debian:bookworm-slim has and debootstrap leaves out, plus this
    network's CA so apt and pip inside the build reach the registries."""
    sources = [f"Types: deb\nURIs: {mirror}\nSuites: {SUITE} {SUITE}-updates\nComponents: main\n"
               "Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg\n"]
    if security:
        sources.append(f"Types: deb\nURIs: {security}\nSuites: {SUITE}-security\nComponents: main\n"
                       "Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg\n")
    (rootfs / "etc/apt/sources.list").unlink(missing_ok=True)
    (rootfs / "etc/apt/sources.list.d").mkdir(parents=True, exist_ok=True)
    (rootfs / "etc/apt/sources.list.d/debian.sources").write_text("\n".join(sources))
    bundle = pip_ca_bundle().read_bytes()
    certs = rootfs / "etc/ssl/certs"
    certs.mkdir(parents=True, exist_ok=True)
    (certs / "ca-certificates.crt").write_bytes(bundle)
    # Kept when a build installs ca-certificates, which regenerates the bundle.
    local = rootfs / "usr/local/share/ca-certificates"
    local.mkdir(parents=True, exist_ok=True)
    (local / "build-network.crt").write_bytes(bundle)
    (rootfs / "etc/pip.conf").write_text("[global]\ncert = /etc/ssl/certs/ca-certificates.crt\n")
    slim(rootfs)


def slim(rootfs: Path) -> None:
    (rootfs / "etc/dpkg/dpkg.cfg.d/docker").write_text(DPKG_SLIM)
    (rootfs / "etc/apt/apt.conf.d/docker-clean").write_text(APT_CLEAN)
    (rootfs / "etc/apt/apt.conf.d/docker-no-languages").write_text('Acquire::Languages "none";\n')
    (rootfs / "etc/apt/apt.conf.d/docker-gzip-indexes").write_text('Acquire::GzipIndexes "true";\n')
    (rootfs / "etc/apt/apt.conf.d/docker-autoremove-suggests").write_text(
        'Apt::AutoRemove::SuggestsImportant "false";\n')
    for pattern in ("usr/share/doc/*/*", "usr/share/man/*", "usr/share/info/*", "usr/share/groff/*",
                    "usr/share/lintian/overrides/*", "usr/share/locale/*", "var/cache/apt/*.bin",
                    "var/cache/apt/archives/*.deb", "var/lib/apt/lists/*_*"):
        for path in rootfs.glob(pattern):
            if path.name in ("copyright", "locale.alias"):
                continue
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()


# --- images and containers ---------------------------------------------------

def build(eng: Engine, tag: str, log=print) -> None:
    """docker/Dockerfile as it is, with the repository as the context."""
    dockerfile = str(ROOT / "docker" / "Dockerfile")
    if eng.name == "podman":
        base = ensure_base(eng, log)
        # The build stage gets a tag of its own, so that removing what earlier
        # builds left behind keeps its layers (the slow pip install) cached.
        eng("build", *eng.build_args, "--target", "build", "-t", f"{tag}-build", "-f", dockerfile, str(ROOT),
            timeout=3600)
    eng("build", *eng.build_args, "-t", tag, "-f", dockerfile, str(ROOT), timeout=3600)
    if eng.name == "podman":
        remove_old_builds(eng, base)


def layers_above_base(eng: Engine, image: str, base: str) -> int:
    """Bytes the image adds on top of its base image."""
    def size(ref: str) -> int:
        return int(eng.text("image", "inspect", "--format", "{{.Size}}", ref))
    return size(image) - size(base)


@dataclass
class Container:
    eng: Engine
    id: str

    def inspect(self, template: str) -> str:
        return self.eng.text("inspect", "--format", template, self.id)

    @property
    def running(self) -> bool:
        return self.inspect("{{.State.Running}}") == "true"

    @property
    def exit_code(self) -> int:
        return int(self.inspect("{{.State.ExitCode}}"))

    def exec(self, *cmd: str, env: dict | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
        flags = [f"--env={k}={v}" for k, v in (env or {}).items()]
        return self.eng("exec", *flags, self.id, *cmd, check=False, timeout=timeout)

    def logs(self) -> str:
        done = self.eng("logs", self.id, check=False)
        return (done.stdout + done.stderr).decode(errors="replace")

    def stop(self, timeout: int) -> float:
        """SIGTERM (the image's STOPSIGNAL), SIGKILL after timeout s; the seconds it took."""
        started = time.monotonic()
        self.eng("stop", "-t", str(timeout), self.id, timeout=timeout + 60)
        return time.monotonic() - started

    def remove(self) -> None:
        self.eng("rm", "-f", self.id, check=False, timeout=120)


def run(eng: Engine, image: str, env: dict | None = None, volumes: list[str] | None = None,
        read_only_with_tmpfs: list[str] | None = None, user: str | None = None,
        extra: list[str] | None = None) -> Container:
    """A detached container on the host network. read_only_with_tmpfs: a
    read-only root filesystem with a tmpfs at each of these paths only."""
    flags = [f"--env={k}={v}" for k, v in (env or {}).items()]
    flags += [f"--volume={v}" for v in volumes or []]
    if read_only_with_tmpfs is not None:
        flags.append("--read-only")
        if eng.name == "podman":
            flags.append("--read-only-tmpfs=false")  # podman would add its own /tmp, /var/tmp and /run
        flags += [f"--tmpfs={path}" for path in read_only_with_tmpfs]
    if user:
        flags.append(f"--user={user}")
    return Container(eng, eng.text("run", "-d", "--network", "host", *flags, *(extra or []), image))


def healthcheck(eng: Engine, image: str) -> list[str]:
    """The image's HEALTHCHECK command, as exec arguments."""
    config = json.loads(eng.text("image", "inspect", "--format", "{{json .Config.Healthcheck}}", image))
    test = config["Test"]
    if test[0] == "CMD":
        return test[1:]
    if test[0] == "CMD-SHELL":
        return ["/bin/sh", "-c", test[1]]
    raise EngineError(f"no usable HEALTHCHECK in {image}: {config}")
