"""`lab.json`: what a lab runs, written by its supervisor, read from any shell.

A lab directory (default `.run/lab/<name>/`) holds:

    lab.json        this record (replaced atomically on every change)
    lab.log         the supervisor's own log
    lab.sock        the supervisor's control socket (`twinctl lab restart`)
    lab.lock        held (flock) by the running supervisor: one supervisor per lab
    pnicd.toml      the pnicd settings every NIC of the lab runs with
    logs/NODE.log   each node's stdout and stderr
    NODE/           each node's state directory (a NIC's key, sockets; a twin's data)

The record::

    {"name": "line3", "file": "/abs/labs/line3.toml", "dir": "/abs/.run/lab/line3",
     "mode": "local" | "netns", "supervisor": PID, "state": STATE, "error": "",
     "namespaces": ["tm1a2b3c-0", ...],
     "nodes": [{"name", "kind": "nic" | "twin" | "twins", "pid", "state", "state_dir",
                "log", "namespace", "key", "links": [NIC names], "listen": [URIs],
                "health": URL, "ports": {...}, "twins": N}],
     "links": [{"from", "to", "carrier", "delay_ms", "loss_pct", "relay_port"}]}

Lab STATE: starting, up, stopping, down, failed. Node state: starting, up, restarting,
stopped, or "exited N" when a process ended on its own.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from twinmesh.errors import TwinmeshError

STATE_FILE = "lab.json"
LOG_FILE = "lab.log"
CONTROL_SOCKET = "lab.sock"
LOCK_FILE = "lab.lock"
PNICD_CONFIG = "pnicd.toml"
LOGS_DIR = "logs"
DEFAULT_ROOT = Path(".run") / "lab"


class LabError(TwinmeshError):
    """A lab cannot be brought up, reached or stopped; the message is one line."""


def default_dir(name: str) -> Path:
    return DEFAULT_ROOT / name


def write_state(lab_dir: Path, record: dict[str, Any]) -> None:
    """Replace `lab.json` atomically (readers never see half a record)."""
    path = lab_dir / STATE_FILE
    tmp = path.with_name(f"{STATE_FILE}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n", "utf-8")
    os.replace(tmp, path)


def read_state(lab_dir: Path) -> dict[str, Any]:
    path = lab_dir / STATE_FILE
    try:
        record: dict[str, Any] = json.loads(path.read_text("utf-8"))
    except FileNotFoundError:
        raise LabError(f"{lab_dir}: no lab here (no {STATE_FILE}); start one with "
                       "'twinctl lab up FILE'") from None
    except (OSError, ValueError) as exc:
        raise LabError(f"{path}: cannot read the lab record: {exc}") from None
    return record


def find_lab_dir(explicit: Path | None, root: Path = DEFAULT_ROOT) -> Path:
    """`explicit`, or the only lab under `root`; LabError naming the choices otherwise."""
    if explicit is not None:
        return explicit
    found = sorted(p.parent for p in root.glob(f"*/{STATE_FILE}")) if root.is_dir() else []
    if len(found) == 1:
        return found[0]
    if not found:
        raise LabError(f"no lab under {root}; start one with 'twinctl lab up FILE' "
                       "or name it with --dir")
    names = ", ".join(str(p) for p in found)
    raise LabError(f"several labs under {root} ({names}); pick one with --dir")


def pid_alive(pid: int | None) -> bool:
    """True while process `pid` exists and is not a zombie."""
    if not pid:
        return False
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    except OSError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def pid_runs_in(pid: int, state_dir: str) -> bool:
    """True when `pid` is alive and its command line names `state_dir`.

    Guards every kill made from a record: a pid written long ago may belong to
    another program by now.
    """
    if not pid_alive(pid):
        return False
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    wanted = os.fsencode(state_dir)
    return any(arg == wanted for arg in cmdline)
