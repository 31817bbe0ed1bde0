"""`python -m bench` runs every benchmark; `python -m bench NAME [ARGS...]` runs one with its arguments."""

from __future__ import annotations

import importlib
import pkgutil
import sys
from pathlib import Path


def main(argv: list[str]) -> int:
    here = Path(__file__).parent
    known = sorted(m.name for m in pkgutil.iter_modules([str(here)]) if not m.name.startswith("_"))
    if argv and argv[0] in known:
        runs = [(argv[0], argv[1:])]
    elif argv:
        print(f"error: unknown benchmark {argv[0]!r}: choose one of {', '.join(known)}", file=sys.stderr)
        return 2
    else:
        runs = [(name, []) for name in known]
    for name, args in runs:
        print(f"== bench.{name} ==", flush=True)
        importlib.import_module(f"bench.{name}").main(args)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
