"""A server process stand-in for the concurrency test: real Store + tracking, driven step by step over stdin.

argv: JSON {"url", "group", "target", "ids", "threads"}. Prints "ready" once the store is open (it
migrates, racing the other workers on an empty database), then for every line "go <now>" checks
every id in at <now> from `threads` threads and prints "done <json list of ids that started>".
"""

from __future__ import annotations

import json
import sys
from concurrent.futures import ThreadPoolExecutor

from update_server import tracking
from update_server.db.store import Store


def main() -> None:
    cfg = json.loads(sys.argv[1])
    store = Store(cfg["url"], pool_size=cfg["threads"])
    version = {mid: "1.0.0" for mid in cfg["ids"]}
    print("ready", flush=True)

    def one(mid: str, now: float) -> str | None:
        out = tracking.check_in(store, tracking.CheckIn(mid, cfg["group"], version[mid], updatecheck=True), now,
                                target=cfg["target"], published_at=0.0)
        return mid if out.decision and out.decision.new_start else None

    with ThreadPoolExecutor(cfg["threads"]) as pool:
        for line in sys.stdin:
            word, _, arg = line.strip().partition(" ")
            if word != "go":
                break
            now = float(arg)
            started = [m for m in pool.map(one, cfg["ids"], [now] * len(cfg["ids"])) if m]
            print("done " + json.dumps(started), flush=True)
    store.close()


if __name__ == "__main__":
    main()
