"""The key file on disk (twinmesh.identity.keystore)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from twinmesh.errors import KeyFileError
from twinmesh.identity.keys import Identity
from twinmesh.identity.keystore import HEADER, load_identity, load_or_create_identity


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def write_key_file(path: Path, content: bytes, file_mode: int = 0o600) -> Path:
    path.write_bytes(content)
    path.chmod(file_mode)
    return path


def assert_one_line_naming(exc: pytest.ExceptionInfo[KeyFileError], path: Path) -> str:
    message = str(exc.value)
    assert str(path) in message
    assert "\n" not in message
    return message


def test_first_start_creates_dir_0700_and_key_0600(tmp_path: Path) -> None:
    state = tmp_path / "state" / "nic"
    identity = load_or_create_identity(state)
    key_file = state / "identity.key"
    assert state.is_dir()
    assert mode(state) == 0o700
    assert key_file.is_file()
    assert mode(key_file) == 0o600
    assert key_file.read_text("ascii") == f"{HEADER}\n{identity.seed.hex()}\n"
    # No temporary file is left behind.
    assert sorted(p.name for p in state.iterdir()) == ["identity.key"]


def test_second_start_loads_the_same_identity(tmp_path: Path) -> None:
    first = load_or_create_identity(tmp_path / "state")
    second = load_or_create_identity(tmp_path / "state")
    assert second.public == first.public
    assert second.seed == first.seed
    assert second.public.verify(first.sign(b"m"), b"m")


def test_other_names_are_other_identities(tmp_path: Path) -> None:
    a = load_or_create_identity(tmp_path, "a.key")
    b = load_or_create_identity(tmp_path, "b.key")
    assert a.public != b.public
    assert load_or_create_identity(tmp_path, "a.key").public == a.public


def test_existing_state_dir_is_used(tmp_path: Path) -> None:
    identity = load_or_create_identity(tmp_path)
    assert load_identity(tmp_path / "identity.key").public == identity.public


@pytest.mark.parametrize("file_mode", [0o644, 0o640, 0o604, 0o660, 0o602])
def test_key_file_open_to_others_is_refused(tmp_path: Path, file_mode: int) -> None:
    identity = load_or_create_identity(tmp_path)
    key_file = tmp_path / "identity.key"
    key_file.chmod(file_mode)
    with pytest.raises(KeyFileError) as exc:
        load_or_create_identity(tmp_path)
    message = assert_one_line_naming(exc, key_file)
    assert f"{file_mode:04o}" in message
    assert "0600" in message
    # Refusing never replaces the identity.
    key_file.chmod(0o600)
    assert load_or_create_identity(tmp_path).public == identity.public


def test_key_file_0400_is_accepted(tmp_path: Path) -> None:
    identity = load_or_create_identity(tmp_path)
    (tmp_path / "identity.key").chmod(0o400)
    assert load_or_create_identity(tmp_path).public == identity.public


GOOD_SEED = (b"\x11" * 32).hex()


@pytest.mark.parametrize(
    "content",
    [
        pytest.param(b"", id="empty"),
        pytest.param(b"\x00\xff\xfe garbage \x80\x81", id="binary-garbage"),
        pytest.param(b"hello world, this is not a key\n", id="text-garbage"),
        pytest.param(f"twinmesh-ed25519-seed-v0\n{GOOD_SEED}\n".encode(), id="wrong-header"),
        pytest.param(f"{GOOD_SEED}\n".encode(), id="no-header"),
        pytest.param(f"{HEADER}\n".encode(), id="no-seed"),
        pytest.param(f"{HEADER}\n{GOOD_SEED[:-2]}\n".encode(), id="short-seed"),
        pytest.param(f"{HEADER}\n{GOOD_SEED}00\n".encode(), id="long-seed"),
        pytest.param(f"{HEADER}\n{GOOD_SEED[:-1]}\n".encode(), id="odd-hex"),
        pytest.param(f"{HEADER}\n{'zz' * 32}\n".encode(), id="non-hex"),
        pytest.param(f"{HEADER}\n{GOOD_SEED}\nextra\n".encode(), id="trailing-junk"),
    ],
)
def test_corrupt_key_file_is_refused_naming_the_file(tmp_path: Path, content: bytes) -> None:
    key_file = write_key_file(tmp_path / "identity.key", content)
    with pytest.raises(KeyFileError) as exc:
        load_or_create_identity(tmp_path)
    message = assert_one_line_naming(exc, key_file)
    assert "corrupt" in message or "cannot read" in message
    # We never silently regenerate: the bad file is still there, unchanged.
    assert key_file.read_bytes() == content


def test_hand_written_key_file_loads(tmp_path: Path) -> None:
    key_file = write_key_file(tmp_path / "identity.key", f"{HEADER}\n{GOOD_SEED}\n".encode())
    assert load_or_create_identity(tmp_path).public == Identity(b"\x11" * 32).public
    assert load_identity(key_file).seed == b"\x11" * 32


def test_key_path_that_is_a_directory_is_refused(tmp_path: Path) -> None:
    (tmp_path / "identity.key").mkdir()
    with pytest.raises(KeyFileError) as exc:
        load_or_create_identity(tmp_path)
    assert "not a regular file" in assert_one_line_naming(exc, tmp_path / "identity.key")


def test_missing_key_file_on_load_is_refused(tmp_path: Path) -> None:
    with pytest.raises(KeyFileError) as exc:
        load_identity(tmp_path / "nope.key")
    assert_one_line_naming(exc, tmp_path / "nope.key")


def test_state_dir_path_that_is_a_file_is_refused(tmp_path: Path) -> None:
    not_a_dir = tmp_path / "state"
    not_a_dir.write_text("I am a file")
    with pytest.raises(KeyFileError) as exc:
        load_or_create_identity(not_a_dir)
    assert "not a directory" in assert_one_line_naming(exc, not_a_dir)
    assert not_a_dir.read_text() == "I am a file"


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
def test_unreadable_key_file_is_refused(tmp_path: Path) -> None:
    load_or_create_identity(tmp_path)
    key_file = tmp_path / "identity.key"
    key_file.chmod(0o000)
    try:
        with pytest.raises(KeyFileError) as exc:
            load_or_create_identity(tmp_path)
        assert_one_line_naming(exc, key_file)
    finally:
        key_file.chmod(0o600)
