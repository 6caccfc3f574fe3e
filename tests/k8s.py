"""The Kubernetes manifests in k8s/, read as kustomize would list them."""
from __future__ import annotations

import yaml

from tests.server import ROOT

K8S = ROOT / "k8s"


def kustomization() -> dict:
    return yaml.safe_load((K8S / "kustomization.yaml").read_text())


def manifests() -> list[dict]:
    docs = []
    for name in kustomization()["resources"]:
        docs += [doc for doc in yaml.safe_load_all((K8S / name).read_text()) if doc]
    return docs


def find(kind: str, name: str) -> dict:
    matches = [d for d in manifests() if d["kind"] == kind and d["metadata"]["name"] == name]
    if len(matches) != 1:
        raise LookupError(f"{len(matches)} {kind} named {name} in k8s/")
    return matches[0]


def pod_spec() -> dict:
    return find("Deployment", "mlserve")["spec"]["template"]["spec"]


def server_container() -> dict:
    return pod_spec()["containers"][0]


def container_environment() -> dict[str, str | None]:
    """Every variable the server container gets: the ConfigMap's, then its own
    env (None for values the pod's spec supplies, such as a resourceFieldRef)."""
    container = server_container()
    values: dict[str, str | None] = {}
    for source in container.get("envFrom", []):
        values.update(find("ConfigMap", source["configMapRef"]["name"])["data"])
    for item in container.get("env", []):
        values[item["name"]] = item.get("value")
    return values


def empty_dirs() -> list[str]:
    """The server container's mount paths that are emptyDir volumes."""
    volumes = {v["name"]: v for v in pod_spec()["volumes"]}
    return [m["mountPath"] for m in server_container()["volumeMounts"] if "emptyDir" in volumes[m["name"]]]
