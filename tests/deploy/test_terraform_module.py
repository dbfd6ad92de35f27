"""deploy/terraform: the module parses, declares what callers need, and -- rendered by the
terraform binary when it is installed -- gives each host a cloud-init that installs
twinmesh with the repository's systemd units and a pnicd.toml that pnicd accepts."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path
from typing import Any

import hcl2
import pytest
import yaml
from deploy_checks import DEPLOY, split_command

from twinmesh.identity.keys import Identity

MODULE = DEPLOY / "terraform"
EXAMPLE = MODULE / "examples" / "hcloud"
_HCL = hcl2.SerializationOptions(strip_string_quotes=True, explicit_blocks=False,
                                 with_comments=False, preserve_heredocs=False)


def parse(directory: Path) -> dict[str, list[dict[str, Any]]]:
    """Every top-level block of the .tf files in `directory`, by block type."""
    blocks: dict[str, list[dict[str, Any]]] = {}
    for path in sorted(directory.glob("*.tf")):
        with path.open(encoding="utf-8") as file:
            for kind, items in hcl2.load(file, serialization_options=_HCL).items():
                blocks.setdefault(kind, []).extend(items)
    return blocks


def named(blocks: dict[str, list[dict[str, Any]]], kind: str) -> dict[str, dict[str, Any]]:
    return {name: body for item in blocks.get(kind, []) for name, body in item.items()}


def test_module_declares_its_inputs_and_outputs():
    blocks = parse(MODULE)
    variables = named(blocks, "variable")
    for required in ("hosts", "twinmesh_package"):
        assert "default" not in variables[required], f"{required} must be given by the caller"
    assert variables["link_port"]["default"] == 9651
    assert variables["hosts"]["validation"], "bad hosts should fail at plan time, with a reason"
    assert {"user_data", "pnicd_config", "peer_uri", "link_port"} <= set(named(blocks, "output"))
    assert not blocks.get("provider"), "the module stays provider-agnostic"


def test_module_reads_the_repositorys_systemd_files():
    text = (MODULE / "main.tf").read_text("utf-8")
    files = re.findall(r'file\("\$\{path\.module\}/([^"]+)"\)', text)
    assert {Path(f).name for f in files} >= {"pnicd.service", "twind@.service",
                                              "twinmesh.sysusers.conf"}
    for relative in files:
        assert (MODULE / relative).is_file(), relative


def test_hcloud_example_builds_one_server_per_host_from_the_module():
    blocks = parse(EXAMPLE)
    [module] = named(blocks, "module").values()
    assert (EXAMPLE / module["source"]).resolve() == MODULE
    hosts = blocks["locals"][0]["hosts"]
    for name, host in hosts.items():
        assert set(host.get("peers", [])) <= set(hosts) - {name}
    server = named(blocks, "resource")["hcloud_server"]["nic"]
    assert server["for_each"] == "${local.hosts}"
    assert server["user_data"] == "${module.twinmesh.user_data[each.key]}"
    firewall = named(blocks, "resource")["hcloud_firewall"]["nic"]
    link_port = "${tostring(module.twinmesh.link_port)}"
    [link_rule] = [rule for rule in firewall["rule"] if rule["port"] == link_port]
    assert link_rule["source_ips"] == ["${hcloud_network_subnet.mesh.ip_range}"]


# --- rendered by terraform itself ------------------------------------------------------


class Terraform:
    """The terraform binary on a copy of deploy/, offline: no providers, no checkpoint."""

    def __init__(self, binary: str, tmp_path: Path) -> None:
        shutil.copytree(DEPLOY, tmp_path / "deploy")
        self.binary = binary
        self.cwd = tmp_path / "deploy" / "terraform"
        (tmp_path / "terraformrc").write_text("", "utf-8")
        self.env = {**os.environ, "CHECKPOINT_DISABLE": "1", "TF_IN_AUTOMATION": "1",
                    "TF_INPUT": "0", "TF_CLI_CONFIG_FILE": str(tmp_path / "terraformrc"),
                    "TF_DATA_DIR": str(tmp_path / "tfdata")}
        self.state = tmp_path / "terraform.tfstate"
        self.vars = tmp_path / "test.tfvars.json"

    def __call__(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([self.binary, *args, "-no-color"], cwd=self.cwd, env=self.env,
                              capture_output=True, text=True, timeout=120)

    def apply(self, variables: dict[str, Any]) -> subprocess.CompletedProcess[str]:
        self.vars.write_text(json.dumps(variables), "utf-8")
        return self("apply", "-auto-approve", f"-state={self.state}", f"-var-file={self.vars}")

    def outputs(self) -> dict[str, Any]:
        result = self("output", "-json", f"-state={self.state}")
        assert result.returncode == 0, result.stderr
        return {name: out["value"] for name, out in json.loads(result.stdout).items()}


@pytest.fixture
def terraform(tmp_path: Path) -> Terraform:
    binary = shutil.which("terraform")
    if binary is None:
        pytest.skip("the terraform binary is not installed; only the HCL parse checks ran")
    return Terraform(binary, tmp_path)


NIC2_KEY = Identity.generate().public.text
HOSTS = {
    "nic1": {"address": "10.42.1.11", "twins": ["alice"]},
    "nic2": {"address": "10.42.1.12", "peers": ["nic1"], "key": NIC2_KEY},
    "nic3": {"address": "10.42.1.13", "peers": ["nic2", "nic1"], "twins": ["bob", "carol"]},
}
PACKAGE = "twinmesh==0.1.0"


def test_terraform_validates_the_module(terraform):
    result = terraform("init", "-backend=false")
    assert result.returncode == 0, result.stderr
    result = terraform("validate", "-json")
    assert json.loads(result.stdout)["valid"] is True, result.stdout


def test_each_host_gets_a_pnicd_toml_that_pnicd_accepts_with_the_units_flags(terraform,
                                                                            pnicd_settings):
    result = terraform.apply({"hosts": HOSTS, "twinmesh_package": PACKAGE})
    assert result.returncode == 0, result.stderr
    outputs = terraform.outputs()
    exec_start = next(line for line in (DEPLOY / "systemd" / "pnicd.service").read_text(
        "utf-8").splitlines() if line.startswith("ExecStart="))
    _, argv = split_command(shlex.split(exec_start.partition("=")[2]))
    for name, host in HOSTS.items():
        settings = pnicd_settings(argv, outputs["pnicd_config"][name])
        assert [(u.host, u.port) for u in settings.listen] == [(host["address"], 9651)]
        expected = [(HOSTS[p]["address"], 9651) for p in host.get("peers", [])]
        assert [(p.host, p.port) for p in settings.peers] == expected
    nic3_peers = pnicd_settings(argv, outputs["pnicd_config"]["nic3"]).peers
    assert nic3_peers[0].key is not None and nic3_peers[0].key.text == NIC2_KEY  # pinned
    assert nic3_peers[1].key is None  # nic1's key is not known yet


def test_each_hosts_cloud_init_installs_twinmesh_and_starts_its_units(terraform):
    result = terraform.apply({"hosts": HOSTS, "twinmesh_package": PACKAGE})
    assert result.returncode == 0, result.stderr
    outputs = terraform.outputs()
    for name, host in HOSTS.items():
        user_data = outputs["user_data"][name]
        assert user_data.startswith("#cloud-config\n")
        cloud_config = yaml.safe_load(user_data)
        written = {f["path"]: f["content"] for f in cloud_config["write_files"]}
        for unit in ("pnicd.service", "twind@.service"):
            repo_text = (DEPLOY / "systemd" / unit).read_text("utf-8")
            assert written[f"/etc/systemd/system/{unit}"] == repo_text
        assert written["/etc/twinmesh/pnicd.toml"] == outputs["pnicd_config"][name]
        commands = [" ".join(c) for c in cloud_config["runcmd"]]
        assert any(c.endswith(f"pip install --no-cache-dir {PACKAGE}") for c in commands)
        assert commands.index("systemd-sysusers") < commands.index(
            "systemctl enable --now pnicd.service")
        started = {c.rpartition(" ")[2] for c in commands if c.startswith("systemctl enable")}
        assert started == {"pnicd.service"} | {f"twind@{t}.service" for t in host.get("twins", [])}


@pytest.mark.parametrize(("hosts", "reason"), [
    ({"a": {"address": "10.42.1.1", "peers": ["b"]}}, "every peer must name another host"),
    ({"a": {"address": "10.42.1.1", "twins": ["Bad Name"]}}, "twin names must be"),
    ({}, "give at least one host"),
])
def test_terraform_refuses_hosts_that_cannot_work(terraform, hosts, reason):
    result = terraform.apply({"hosts": hosts, "twinmesh_package": PACKAGE})
    assert result.returncode != 0
    assert reason in " ".join(result.stderr.split())
