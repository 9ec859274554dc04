"""`make bench`: run every bench/bench_*.py `main()`; each prints its figures and writes
bench/results/<topic>.json.

`python -m bench` runs all; `python -m bench hub export` runs the named ones.
"""

from __future__ import annotations

import importlib
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main(argv: list[str]) -> int:
    names = argv or sorted(p.stem.removeprefix("bench_") for p in HERE.glob("bench_*.py"))
    summary: dict[str, object] = {}
    failed = []
    for name in names:
        print(f"\n=== bench {name} ===", flush=True)
        t0 = time.perf_counter()
        try:
            result = importlib.import_module(f"bench.bench_{name}").main()
            summary[name] = {"ok": True, "wall_s": round(time.perf_counter() - t0, 1), "result": result}
        except Exception as e:  # noqa: BLE001 - one broken benchmark must not hide the others' figures
            print(f"bench {name} failed: {type(e).__name__}: {e}", file=sys.stderr)
            summary[name] = {"ok": False, "error": f"{type(e).__name__}: {e}"}
            failed.append(name)
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    print(f"\nwrote {HERE / 'results' / 'summary.json'}; failed: {failed or 'none'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
