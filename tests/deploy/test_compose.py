"""deploy/docker-compose.yml: valid against the Compose Specification schema, three NICs
in a line with a twin each, on an internal network with nothing published."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import yaml
from deploy_checks import DEPLOY, REPO, probe_urls, split_command

from twinmesh.twin.service import CONTROL_SOCKET

COMPOSE = DEPLOY / "docker-compose.yml"


def compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE.read_text("utf-8"))
    assert isinstance(data, dict)
    return data


def services_running(program: str) -> dict[str, dict[str, Any]]:
    return {name: service for name, service in compose()["services"].items()
            if split_command(service["command"])[0] == program}


def mounts(service: dict[str, Any]) -> dict[PurePosixPath, str]:
    """Container path -> named volume."""
    found = {}
    for spec in service.get("volumes", []):
        source, target = spec.split(":")[:2]
        found[PurePosixPath(target)] = source
    return found


def volume_holding(service: dict[str, Any], path: Path) -> str:
    for target, source in mounts(service).items():
        if PurePosixPath(path).is_relative_to(target):
            return source
    pytest.fail(f"{path} is on no volume: its keys would die with the container")


def test_compose_file_is_valid_against_the_compose_spec_schema():
    # check-jsonschema ships the Compose Specification schema: no network needed.
    result = subprocess.run(
        [sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.compose-spec",
         str(COMPOSE)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_three_nics_are_linked_in_a_line(pnicd_settings):
    nics = services_running("pnicd")
    assert len(nics) == 3
    settings = {name: pnicd_settings(split_command(s["command"])[1]) for name, s in nics.items()}
    links = set()
    for name, nic in settings.items():
        for peer in nic.peers:
            assert peer.host in settings, f"{name} dials {peer.host}, which is not a NIC service"
            target = settings[peer.host]
            assert any((u.scheme, u.port, u.path) == (peer.scheme, peer.port, peer.path)
                       for u in target.listen), f"{name} dials {peer}; {peer.host} does not listen"
            links.add(frozenset((name, peer.host)))
    degrees = sorted(sum(name in link for link in links) for name in settings)
    assert len(links) == 2 and degrees == [1, 1, 2], f"not a line: {links}"


def test_each_nic_keeps_its_key_on_a_volume_of_its_own(pnicd_settings):
    nics = services_running("pnicd")
    volumes = [volume_holding(s, pnicd_settings(split_command(s["command"])[1]).state_dir)
               for s in nics.values()]
    assert len(set(volumes)) == len(nics)
    assert set(volumes) <= set(compose()["volumes"])


def test_each_nic_has_one_twin_attached_through_the_shared_volume(pnicd_settings, twind_args):
    nics = services_running("pnicd")
    twins = services_running("twind")
    attached = []
    for name, twin in twins.items():
        args = twind_args(split_command(twin["command"])[1])
        [nic_path] = args.nic
        for nic_name, nic in nics.items():
            state_dir = pnicd_settings(split_command(nic["command"])[1]).state_dir
            if (nic_path == state_dir
                    and volume_holding(twin, nic_path) == volume_holding(nic, state_dir)):
                attached.append(nic_name)
                assert twin["depends_on"][nic_name]["condition"] == "service_healthy"
                break
        else:
            pytest.fail(f"{name}: --nic {nic_path} is no NIC's state dir on a shared volume")
        volume_holding(twin, args.state_dir)
        assert CONTROL_SOCKET in " ".join(twin["healthcheck"]["test"])
    assert sorted(attached) == sorted(nics)


def test_the_mesh_is_on_an_internal_network_and_publishes_nothing():
    data = compose()
    assert data["networks"], "declare the mesh network"
    for name, network in data["networks"].items():
        assert network.get("internal") is True, f"network {name} must be internal"
    for name, service in data["services"].items():
        assert "ports" not in service, f"{name} publishes ports"
        assert service.get("network_mode") is None, f"{name} leaves the internal network"
        assert set(service["networks"]) <= set(data["networks"])


def test_every_container_is_read_only_without_capabilities():
    for name, service in compose()["services"].items():
        assert service.get("read_only") is True, name
        assert service.get("cap_drop") == ["ALL"], name
        assert "no-new-privileges:true" in service.get("security_opt", []), name


def test_the_image_is_built_from_the_deploy_dockerfile():
    for name, service in compose()["services"].items():
        build = service["build"]
        context = (COMPOSE.parent / build["context"]).resolve()
        assert context == REPO, f"{name}: the image builds from the repository root"
        assert (context / build["dockerfile"]).resolve() == DEPLOY / "Dockerfile"


def test_nics_are_health_checked_by_the_images_healthcheck_on_their_health_port(
        pnicd_settings):
    [(host, port, path)] = probe_urls((DEPLOY / "Dockerfile").read_text("utf-8"))
    for name, nic in services_running("pnicd").items():
        assert "healthcheck" not in nic, f"{name}: the image's HEALTHCHECK probes pnicd"
        settings = pnicd_settings(split_command(nic["command"])[1])
        assert settings.health == (host, port), f"{name}: the HEALTHCHECK probes {host}:{port}"
    assert path == "/healthz"
