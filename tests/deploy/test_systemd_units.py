"""deploy/systemd: the units run the daemons with flags they accept, hardened, and
`systemd-analyze` finds nothing wrong with them."""

from __future__ import annotations

import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from deploy_checks import DEPLOY, split_command

from twinmesh.nic.config import KEY_FILE
from twinmesh.twin.service import CONTROL_SOCKET

UNITS = DEPLOY / "systemd"
PNICD = UNITS / "pnicd.service"
TWIND = UNITS / "twind@.service"
INSTANCE = "alice"

Unit = dict[str, list[tuple[str, str]]]


def parse_unit(path: Path) -> Unit:
    """Sections of a unit file as (key, value) lists: keys repeat, and order matters."""
    sections: Unit = {}
    current: list[tuple[str, str]] | None = None
    pending = ""
    for number, raw in enumerate(path.read_text("utf-8").splitlines(), 1):
        line = pending + raw.strip()
        pending = ""
        if line.endswith("\\"):
            pending = line[:-1] + " "
            continue
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], [])
        elif "=" in line and current is not None:
            key, _, value = line.partition("=")
            current.append((key.strip(), value.strip()))
        else:
            pytest.fail(f"{path.name}:{number}: not a unit file line: {raw!r}")
    return sections


def values(unit: Unit, section: str, key: str) -> list[str]:
    return [value for name, value in unit.get(section, []) if name == key]


def one(unit: Unit, section: str, key: str) -> str:
    found = values(unit, section, key)
    assert len(found) == 1, f"[{section}] {key}= should be set once, found {found}"
    return found[0]


def exec_start(unit: Unit, instance: str = INSTANCE) -> tuple[str, list[str]]:
    """The program and its arguments, with %i filled in and unset $VARS dropped."""
    words = shlex.split(one(unit, "Service", "ExecStart").replace("%i", instance))
    return split_command([w for w in words if not w.startswith("$")])


def state_directory(unit: Unit, instance: str = INSTANCE) -> Path:
    return Path("/var/lib") / one(unit, "Service", "StateDirectory").replace("%i", instance)


def test_pnicd_unit_runs_pnicd_with_flags_and_config_it_accepts(pnicd_settings):
    unit = parse_unit(PNICD)
    program, argv = exec_start(unit)
    assert program == "pnicd"
    config_file = Path(argv[argv.index("--config") + 1])
    assert config_file.parent == Path("/etc") / one(unit, "Service", "ConfigurationDirectory")
    settings = pnicd_settings(argv, (UNITS / config_file.name).read_text("utf-8"))
    assert settings.state_dir == state_directory(unit)
    assert settings.health is not None and settings.health[0] == "127.0.0.1"
    assert settings.listen, "pnicd.toml must listen for links from other hosts"
    assert settings.log_format == "json"


def test_twind_unit_runs_each_twin_on_its_own_state_dir_attached_to_pnicd(twind_args):
    unit = parse_unit(TWIND)
    program, argv = exec_start(unit)
    assert program == "twind"
    args = twind_args(argv)
    assert args.state_dir == state_directory(unit) == Path("/var/lib/twinmesh/twins") / INSTANCE
    assert args.nic == [state_directory(parse_unit(PNICD))]
    assert "pnicd.service" in values(unit, "Unit", "Requires")
    assert "pnicd.service" in values(unit, "Unit", "After")


def test_twind_unit_cannot_read_the_nic_key():
    # Same user as pnicd (its twins.sock is 0600), so the key is hidden from the twin.
    nic_key = state_directory(parse_unit(PNICD)) / KEY_FILE
    hidden = " ".join(values(parse_unit(TWIND), "Service", "InaccessiblePaths")).split()
    assert f"-{nic_key}" in hidden or str(nic_key) in hidden


@pytest.mark.parametrize("path", [PNICD, TWIND], ids=lambda p: p.name)
def test_unit_is_hardened_and_restarts_on_failure(path):
    unit = parse_unit(path)
    expected = {
        "Type": "exec",  # the daemons log to stderr and send no readiness notification
        "Restart": "on-failure",
        "RestartPreventExitStatus": "2",  # bad config or key file: restarting cannot help
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "StateDirectoryMode": "0700",
        "UMask": "0077",
        "CapabilityBoundingSet": "",
    }
    for key, value in expected.items():
        assert one(unit, "Service", key) == value, f"{path.name}: {key}"
    assert one(unit, "Service", "User") not in ("root", "0")
    families = " ".join(values(unit, "Service", "RestrictAddressFamilies")).split()
    assert "AF_UNIX" in families  # admin.sock, twins.sock, control.sock
    assert values(unit, "Install", "WantedBy") == ["multi-user.target"]


def test_the_daemons_user_is_created_by_the_sysusers_file():
    declared = {
        line.split()[1]
        for line in (UNITS / "twinmesh.sysusers.conf").read_text("utf-8").splitlines()
        if line.startswith("u ")
    }
    for path in (PNICD, TWIND):
        assert one(parse_unit(path), "Service", "User") in declared


def test_twin_health_probes_elsewhere_use_the_same_control_socket_name():
    # compose and k8s probe twind's control socket; the unit documents where it lives.
    assert CONTROL_SOCKET in TWIND.read_text("utf-8")


@pytest.fixture
def installable_units(tmp_path: Path) -> Path:
    """The units with ExecStart pointing at this venv's daemons (verify wants real binaries)."""
    bin_dir = Path(sys.executable).parent
    for program in ("pnicd", "twind"):
        if not (bin_dir / program).exists():
            pytest.skip(f"{program} is not installed in {bin_dir}")
    for path in (PNICD, TWIND):
        text = path.read_text("utf-8").replace("/opt/twinmesh/bin/", f"{bin_dir}/")
        (tmp_path / path.name).write_text(text, "utf-8")
    instance = tmp_path / TWIND.name.replace("@", f"@{INSTANCE}")
    shutil.copy(tmp_path / TWIND.name, instance)
    return tmp_path


def _systemd_analyze(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.skip("systemd-analyze is not installed (Debian package: systemd)")
    return subprocess.run([tool, *args], cwd=cwd, capture_output=True, text=True, timeout=60)


def test_systemd_analyze_verify_finds_nothing(installable_units):
    units = ["./pnicd.service", f"./twind@{INSTANCE}.service"]
    result = _systemd_analyze("verify", "--man=no", *units, cwd=installable_units)
    # verify exits 0 on unknown or misplaced keys too: only its silence means "all good".
    complaints = [line for line in result.stderr.splitlines()
                  if "pnicd" in line or "twind" in line]
    assert result.returncode == 0 and not complaints, result.stderr


@pytest.mark.parametrize("name", ["pnicd.service", f"twind@{INSTANCE}.service"])
def test_systemd_analyze_security_rates_the_unit_well_hardened(installable_units, name):
    # Exposure is shown from 0 (locked down) to 10 (unprotected), ours about 1.2, but
    # --threshold counts in tenths: 20 fails at an exposure above 2.0.
    result = _systemd_analyze("security", "--offline=yes", "--threshold=20", "--no-pager",
                              f"./{name}", cwd=installable_units)
    if "--offline" in result.stderr and "unrecognized" in result.stderr:
        pytest.skip("this systemd-analyze has no --offline (needs systemd >= 250)")
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr
