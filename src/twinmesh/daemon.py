"""What the daemons (pnicd, twind) share: one per state dir, one-line user errors."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from twinmesh.errors import ConfigError, KeyFileError, StorageError

USER_ERRORS = (ConfigError, KeyFileError, StorageError)


def lock_state_dir(state_dir: Path, lock_file: str, daemon: str) -> int:
    """Hold an exclusive lock on `state_dir/lock_file` (released when the process
    ends, however it ends); ConfigError when another `daemon` holds it."""
    fd = os.open(state_dir / lock_file, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise ConfigError(f"{state_dir}: another {daemon} is already running here") from None
    return fd


def sole_user_error(group: BaseExceptionGroup) -> BaseException:
    """The one user error (bad setting, key file, store) inside `group`, else `group`.

    A bad setting found while starting a service inside a nursery (a busy address, a
    non-loopback health port) arrives wrapped in one exception group per nursery."""
    matched, rest = group.split(USER_ERRORS)
    if matched is not None and rest is None:
        leaves = _leaves(matched)
        return leaves[0] if len(leaves) == 1 else group
    return group


def _leaves(group: BaseExceptionGroup) -> list[BaseException]:
    found: list[BaseException] = []
    for exc in group.exceptions:
        found += _leaves(exc) if isinstance(exc, BaseExceptionGroup) else [exc]
    return found
