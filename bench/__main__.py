"""`make bench`: run every bench/bench_*.py `main()`; each prints its figures and writes
bench/results/<topic>.json; then one table of the headline ratios (bench/results/summary.json too).

`python -m bench` runs all at 64 and 224 px (bench/results/summary.json); `python -m bench hub export` runs
the named ones, `BENCH_SIZES=224 python -m bench ...` only the 224 px parts (a partial run's table goes to
bench/results/summary-partial.json).
"""

from __future__ import annotations

import importlib
import json
import os
import sys
import time
from pathlib import Path

from bench.common import cpu_info
from bench.summary import rows, table

HERE = Path(__file__).resolve().parent
BUSY_LOAD_PER_CORE = 0.25  # a 1-minute load average above this share of the cores: timings are contended


def idle_note() -> tuple[bool, str]:
    """Whether the machine looks idle enough for timings, and a line saying so (load average vs cores)."""
    cpu = cpu_info()
    load, cores = cpu["load_avg_1min"], cpu["cores"] or 1
    if load is None:
        return True, "bench: load average unknown on this platform"
    idle = load <= BUSY_LOAD_PER_CORE * cores
    verdict = "idle enough" if idle else "BUSY: absolute figures are low, ratios measured side by side hold"
    return idle, (
        f"bench: 1-minute load average {load:.2f} on {cores} cores ({verdict}); CPU {cpu['model']}, "
        f"flags {' '.join(cpu['flags']) or 'none of interest'}"
    )


def main(argv: list[str]) -> int:
    names = argv or sorted(p.stem.removeprefix("bench_") for p in HERE.glob("bench_*.py"))
    idle, note = idle_note()
    print(note, flush=True)
    summary: dict[str, object] = {"machine": {"idle": idle, "note": note, "cpu": cpu_info()}}
    returned: dict[str, object] = {}
    failed = []
    for name in names:
        print(f"\n=== bench {name} ===", flush=True)
        t0 = time.perf_counter()
        try:
            result = importlib.import_module(f"bench.bench_{name}").main()
            returned[name] = result
            summary[name] = {"ok": True, "wall_s": round(time.perf_counter() - t0, 1), "result": result}
        except Exception as e:  # noqa: BLE001 - one broken benchmark must not hide the others' figures
            print(f"bench {name} failed: {type(e).__name__}: {e}", file=sys.stderr)
            summary[name] = {"ok": False, "error": f"{type(e).__name__}: {e}"}
            failed.append(name)
    ratios = rows(returned, HERE / "results")
    summary["ratios"] = [
        dict(zip(("benchmark", "ratio", "compared", "value"), r, strict=True)) for r in ratios
    ]
    (HERE / "results").mkdir(exist_ok=True)
    # a run of some benchmarks (or sizes) leaves the full run's summary.json as it was
    partial = bool(argv) or "BENCH_SIZES" in os.environ
    out = HERE / "results" / ("summary-partial.json" if partial else "summary.json")
    out.write_text(json.dumps(summary, indent=2, default=str) + "\n")
    print(f"\n{note}\n{table(ratios)}")
    print(f"\nwrote {out}; failed: {failed or 'none'}")
    return 1 if failed else 0


if __name__ == "__main__":
    os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
    sys.exit(main(sys.argv[1:]))
