"""deploy/k8s: valid against the Kubernetes schemas; NICs as a StatefulSet with a volume
(and so a key) per pod, found through a headless service, each with its twin beside it."""

from __future__ import annotations

import functools
import os
import subprocess
from pathlib import Path, PurePosixPath
from typing import Any

import kubernetes_validate
import pytest
import yaml
from deploy_checks import DEPLOY, probe_urls, split_command
from kubernetes_validate.utils import SchemaNotFoundError

from twinmesh.nic.config import KEY_FILE
from twinmesh.twin.service import CONTROL_SOCKET

MANIFESTS = DEPLOY / "k8s"
# Native sidecars (init containers with restartPolicy: Always) are on by default from 1.29.
KUBERNETES_VERSION = "1.30.0"


@functools.cache
def documents() -> list[tuple[str, dict[str, Any]]]:
    found = []
    for path in sorted(MANIFESTS.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text("utf-8")):
            if doc:
                found.append((path.name, doc))
    return found


def the(kind: str, name: str | None = None) -> dict[str, Any]:
    matches = [doc for _, doc in documents()
               if doc["kind"] == kind and name in (None, doc["metadata"]["name"])]
    assert len(matches) == 1, f"expected one {kind} {name or ''}, found {len(matches)}"
    return matches[0]


def nic_set() -> dict[str, Any]:
    return the("StatefulSet", "nic")


def pod_spec() -> dict[str, Any]:
    spec: dict[str, Any] = nic_set()["spec"]["template"]["spec"]
    return spec


def container(name: str) -> dict[str, Any]:
    spec = pod_spec()
    [found] = [c for c in spec.get("initContainers", []) + spec["containers"]
               if c["name"] == name]
    return found


def config_files() -> dict[str, str]:
    data: dict[str, str] = the("ConfigMap", "nic-config")["data"]
    return data


def mount_of(spec: dict[str, Any], volume: str) -> PurePosixPath:
    [path] = [m["mountPath"] for m in spec["volumeMounts"] if m["name"] == volume]
    return PurePosixPath(path)


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(key) == value for key, value in selector.items())


class StartScript:
    """The ConfigMap's start-nic.sh, run by /bin/sh with a stand-in pnicd that records argv."""

    def __init__(self, tmp_path: Path) -> None:
        self.script = tmp_path / "start-nic.sh"
        self.script.write_text(config_files()["start-nic.sh"], "utf-8")
        self.record = tmp_path / "argv"
        stub = tmp_path / "bin" / "pnicd"
        stub.parent.mkdir()
        stub.write_text(f"#!/bin/sh\nprintf '%s\\0' \"$@\" > '{self.record}'\n", "utf-8")
        stub.chmod(0o755)
        self.env = {e["name"]: e["value"] for e in container("pnicd")["env"] if "value" in e}
        self.env["PATH"] = f"{stub.parent}{os.pathsep}{os.environ['PATH']}"

    def run(self, pod_name: str) -> subprocess.CompletedProcess[str]:
        self.record.unlink(missing_ok=True)
        return subprocess.run(["/bin/sh", str(self.script)], capture_output=True, text=True,
                              timeout=30, env={**self.env, "POD_NAME": pod_name})

    def argv(self, pod_name: str) -> list[str]:
        """What the script hands pnicd in pod `pod_name`."""
        result = self.run(pod_name)
        assert result.returncode == 0, result.stderr
        return self.record.read_text("utf-8").split("\0")[:-1]


@pytest.fixture
def start_nic(tmp_path: Path) -> StartScript:
    return StartScript(tmp_path)


@pytest.mark.parametrize("doc", documents(),
                         ids=lambda d: f"{d[1]['kind']}/{d[1]['metadata']['name']}")
def test_manifest_is_valid_against_the_kubernetes_schema(doc):
    name, resource = doc
    try:
        kubernetes_validate.validate(resource, KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.ValidationError as exc:
        path = ".".join(str(p) for p in exc.path)
        pytest.fail(f"{name}: {resource['kind']}: {path}: {exc.message}")
    except SchemaNotFoundError as exc:
        pytest.fail(f"{name}: {exc.message}")


def test_nics_find_each_other_through_a_headless_service():
    service = the("Service", nic_set()["spec"]["serviceName"])
    assert service["spec"]["clusterIP"] == "None"
    assert service["spec"]["publishNotReadyAddresses"] is True
    labels = nic_set()["spec"]["template"]["metadata"]["labels"]
    assert selects(service["spec"]["selector"], labels)
    assert selects(nic_set()["spec"]["selector"]["matchLabels"], labels)


def test_pod_k_links_to_the_two_pods_before_it_by_their_stable_names(start_nic,
                                                                     pnicd_settings):
    set_name = nic_set()["metadata"]["name"]
    service = the("Service", nic_set()["spec"]["serviceName"])
    [link_port] = [p["port"] for p in service["spec"]["ports"] if p["name"] == "link"]
    for ordinal, expected in [(0, []), (1, [0]), (2, [1, 0]), (7, [6, 5])]:
        settings = pnicd_settings(start_nic.argv(f"{set_name}-{ordinal}"),
                                  config_files()["pnicd.toml"])
        assert [(p.host, p.port) for p in settings.peers] == [
            (f"{set_name}-{k}.{service['metadata']['name']}", link_port) for k in expected]
        assert [u.port for u in settings.listen] == [link_port]


def test_start_script_refuses_a_pod_name_without_an_ordinal(start_nic):
    result = start_nic.run("nic")
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "POD_NAME=nic" in result.stderr


def test_each_pod_keeps_nic_and_twin_keys_on_its_own_volume(start_nic, pnicd_settings,
                                                            twind_args):
    [claim] = nic_set()["spec"]["volumeClaimTemplates"]
    volume = claim["metadata"]["name"]
    assert claim["spec"]["accessModes"] == ["ReadWriteOnce"]
    settings = pnicd_settings(start_nic.argv("nic-0"), config_files()["pnicd.toml"])
    assert PurePosixPath(settings.state_dir / KEY_FILE).is_relative_to(
        mount_of(container("pnicd"), volume))
    args = twind_args(split_command(container("twind")["command"])[1])
    assert PurePosixPath(args.state_dir).is_relative_to(mount_of(container("twind"), volume))
    # The twin attaches to pnicd's twins.sock, on the volume both containers mount.
    assert args.nic == [settings.state_dir]
    assert mount_of(container("twind"), volume) == mount_of(container("pnicd"), volume)
    security = pod_spec()["securityContext"]
    # A recursive chown/chmod of the volume would make nic.key group-readable: pnicd
    # refuses such a key.
    assert security.get("fsGroupChangePolicy") == "OnRootMismatch"


def test_pnicd_runs_the_mounted_start_script_and_config():
    pnicd = container("pnicd")
    config_dir = mount_of(pnicd, "config")
    [config_volume] = [v for v in pod_spec()["volumes"] if v["name"] == "config"]
    assert config_volume["configMap"]["name"] == "nic-config"
    assert pnicd["command"] == ["/bin/sh", str(config_dir / "start-nic.sh")]
    assert f"{config_dir}/pnicd.toml" in config_files()["start-nic.sh"]
    service = the("Service", nic_set()["spec"]["serviceName"])
    [link] = [p for p in service["spec"]["ports"] if p["name"] == "link"]
    assert {"name": "link", "containerPort": link["port"], "protocol": "TCP"} in pnicd["ports"]


def test_pnicd_is_a_sidecar_that_is_up_before_the_twin_starts():
    pnicd = container("pnicd")
    assert pnicd in pod_spec()["initContainers"] and pnicd["restartPolicy"] == "Always"
    assert "startupProbe" in pnicd


def test_pnicd_probes_fetch_healthz_on_its_health_address(start_nic, pnicd_settings):
    settings = pnicd_settings(start_nic.argv("nic-0"), config_files()["pnicd.toml"])
    pnicd = container("pnicd")
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        # The health endpoint is loopback-only: the kubelet cannot reach it, exec can.
        command = pnicd[probe]["exec"]["command"]
        assert probe_urls(command) == [(*settings.health, "/healthz")], probe


def test_twin_probes_look_for_its_control_socket(twind_args):
    twind = container("twind")
    args = twind_args(split_command(twind["command"])[1])
    for probe in ("readinessProbe", "livenessProbe"):
        assert str(PurePosixPath(args.state_dir) / CONTROL_SOCKET) in " ".join(
            twind[probe]["exec"]["command"]), probe


@pytest.mark.parametrize("name", ["pnicd", "twind"])
def test_container_is_bounded_and_unprivileged(name):
    spec = container(name)
    assert {"cpu", "memory"} <= set(spec["resources"]["limits"])
    assert {"cpu", "memory"} <= set(spec["resources"]["requests"])
    security = spec["securityContext"]
    assert security["allowPrivilegeEscalation"] is False
    assert security["readOnlyRootFilesystem"] is True
    assert security["capabilities"]["drop"] == ["ALL"]
    pod = pod_spec()["securityContext"]
    assert pod["runAsNonRoot"] is True and pod["runAsUser"] != 0
    assert pod["seccompProfile"]["type"] == "RuntimeDefault"


def test_network_policy_lets_nics_link_only_to_nics():
    labels = nic_set()["spec"]["template"]["metadata"]["labels"]
    policy = the("NetworkPolicy", "nic-links")["spec"]
    assert selects(policy["podSelector"]["matchLabels"], labels)
    [ingress] = policy["ingress"]
    assert all(selects(peer["podSelector"]["matchLabels"], labels) for peer in ingress["from"])
    [port] = [p["containerPort"] for p in container("pnicd")["ports"] if p["name"] == "link"]
    assert ingress["ports"] == [{"protocol": "TCP", "port": port}]
    deny = the("NetworkPolicy", "default-deny")["spec"]
    assert deny["podSelector"] == {} and set(deny["policyTypes"]) == {"Ingress", "Egress"}


def test_every_namespaced_resource_is_in_the_twinmesh_namespace():
    namespace = the("Namespace")["metadata"]["name"]
    for name, doc in documents():
        if doc["kind"] != "Namespace":
            assert doc["metadata"].get("namespace") == namespace, f"{name}: {doc['kind']}"
