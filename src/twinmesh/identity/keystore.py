"""The only place key files are read or written.

A key file holds one line of header and the hex seed. It is created on first start
with mode 0600 inside a state directory created with mode 0700. A key file that is
readable or writable by group or others, or that does not parse, is refused with a
one-line KeyFileError naming the file: we never silently regenerate an identity.
"""

from __future__ import annotations

import binascii
import os
import stat
from pathlib import Path

from twinmesh.errors import KeyFileError
from twinmesh.identity.keys import KEY_SIZE, Identity

HEADER = "twinmesh-ed25519-seed-v1"


def ensure_state_dir(path: Path) -> Path:
    """Create `path` (mode 0700) if missing; refuse a path that is not a directory."""
    if path.exists() and not path.is_dir():
        raise KeyFileError(f"{path}: state directory path exists and is not a directory")
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    return path


def load_or_create_identity(state_dir: Path, name: str = "identity.key") -> Identity:
    """Load the identity in `state_dir/name`, creating both on first start."""
    ensure_state_dir(state_dir)
    key_path = state_dir / name
    if not key_path.exists():
        identity = Identity.generate()
        _write_new(key_path, identity)
        return identity
    return load_identity(key_path)


def load_identity(key_path: Path) -> Identity:
    try:
        st = key_path.stat()
    except OSError as exc:
        raise KeyFileError(f"{key_path}: cannot read key file: {exc.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        raise KeyFileError(f"{key_path}: key file is not a regular file")
    if st.st_mode & 0o077:
        raise KeyFileError(
            f"{key_path}: key file permissions {stat.S_IMODE(st.st_mode):04o} are too open "
            "(must be 0600)"
        )
    try:
        text = key_path.read_text("ascii")
    except (OSError, UnicodeDecodeError) as exc:
        raise KeyFileError(f"{key_path}: cannot read key file: {exc}") from None
    lines = text.split()
    if len(lines) != 2 or lines[0] != HEADER:
        raise KeyFileError(f"{key_path}: corrupt key file (expected '{HEADER}' and a hex seed)")
    try:
        seed = binascii.unhexlify(lines[1])
    except binascii.Error:
        raise KeyFileError(f"{key_path}: corrupt key file (seed is not hex)") from None
    if len(seed) != KEY_SIZE:
        raise KeyFileError(f"{key_path}: corrupt key file (seed is {len(seed)} bytes, not 32)")
    return Identity(seed)


def _write_new(key_path: Path, identity: Identity) -> None:
    # Write to a temporary name then rename, so a crash never leaves a half key file.
    tmp = key_path.with_name(key_path.name + ".tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, f"{HEADER}\n{identity.seed.hex()}\n".encode("ascii"))
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, key_path)
