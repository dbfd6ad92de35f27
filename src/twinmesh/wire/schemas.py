"""Load the Cap'n Proto schemas once, at import.

In a wheel the schemas ship as `twinmesh/schemas/`; in a source checkout (editable
install, tests) they are read from the repository's top-level `schemas/`.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import capnp

from twinmesh.errors import DecodeError

capnp.remove_import_hook()

_HERE = Path(__file__).resolve().parent
_CANDIDATES = (_HERE.parent / "schemas", _HERE.parents[2] / "schemas")


def schema_dir() -> Path:
    for candidate in _CANDIDATES:
        if (candidate / "link.capnp").is_file():
            return candidate
    raise RuntimeError(f"twinmesh schemas not found in any of {[str(c) for c in _CANDIDATES]}")


def _load(name: str) -> Any:
    directory = schema_dir()
    return capnp.load(str(directory / name), imports=[str(directory)])


link: Any = _load("link.capnp")
admin: Any = _load("admin.capnp")
route: Any = _load("route.capnp")
local: Any = _load("local.capnp")
rmb: Any = _load("rmb.capnp")
api: Any = _load("api.capnp")
dht: Any = _load("dht.capnp")

# Readers refuse messages that would make them walk more than this many words or this
# deep, so a hostile frame cannot cost more than its own size to look at.
TRAVERSAL_LIMIT_WORDS = 1 << 20
NESTING_LIMIT = 16

T = TypeVar("T")


def union_tags(struct: Any) -> dict[str, int]:
    """Member name -> union discriminant of `struct`'s unnamed union (for the flat
    readers and writers of `twinmesh.wire.flat`)."""
    fields = struct.schema.node.struct.fields
    return {str(f.name): int(f.discriminantValue) for f in fields
            if f.discriminantValue != 0xFFFF}


def decode(struct: Any, data: bytes, extract: Callable[[Any], T]) -> T:
    """Decode `data` as `struct` and return `extract(reader)`.

    The reader is only valid inside this call, so `extract` must copy out what it
    needs. Any decoding failure, including one discovered lazily while `extract`
    reads a field, becomes a DecodeError.
    """
    try:
        with struct.from_bytes(
            data, traversal_limit_in_words=TRAVERSAL_LIMIT_WORDS, nesting_limit=NESTING_LIMIT
        ) as reader:
            return extract(reader)
    except DecodeError:
        raise
    # pycapnp raises RuntimeError for some faults it finds lazily, e.g. reading an enum
    # value this schema does not know ("Member was null").
    except (
        capnp.KjException,
        RuntimeError,
        ValueError,
        TypeError,
        AttributeError,
        IndexError,
    ) as exc:
        name = _struct_name(struct)
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DecodeError(f"undecodable {name}: {first_line[:160]}") from None


def _struct_name(struct: Any) -> str:
    try:
        return str(struct.schema.node.displayName).rsplit(":", 1)[-1]
    except AttributeError:
        return getattr(struct, "__name__", None) or str(struct)
