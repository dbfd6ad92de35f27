"""`twind` entry point. The twin daemon is not built yet; say so plainly."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    print("twind: the twin daemon is not part of this release yet; only pnicd and "
          "'twinctl nic' are available", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
