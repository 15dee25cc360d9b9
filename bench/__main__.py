"""`make bench`: run every benchmark module; each prints one JSON line per figure.

Benchmarks never fail on a number. A benchmark that crashes is reported and the
rest still run; the exit code says whether every benchmark ran.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ORDER = ("bench_kite_sim", "bench_api", "bench_scheduler", "bench_stoploss", "bench_executor", "bench_open_burst")


def main() -> int:
    out_dir = ROOT / "bench" / "out"
    out_dir.mkdir(parents=True, exist_ok=True)
    present = [n for n in ORDER if (ROOT / "bench" / f"{n}.py").exists()]
    present += sorted(p.stem for p in (ROOT / "bench").glob("bench_*.py") if p.stem not in ORDER)
    failed = []
    with open(out_dir / "results.jsonl", "w") as results:
        for name in present:
            print(f"# {name}", file=sys.stderr, flush=True)
            started = time.monotonic()
            proc = subprocess.run([sys.executable, "-m", f"bench.{name}"], cwd=ROOT, stdout=subprocess.PIPE,
                                  text=True, check=False)
            for line in proc.stdout.splitlines():
                print(line, flush=True)
                if line.startswith("{"):
                    results.write(line + "\n")
            took = time.monotonic() - started
            if proc.returncode != 0:
                failed.append(name)
                print(f"# {name} FAILED (exit {proc.returncode}) after {took:.0f}s", file=sys.stderr)
            else:
                print(f"# {name} done in {took:.0f}s", file=sys.stderr)
    print(f"# figures in {out_dir / 'results.jsonl'}, plots in {out_dir}/*.png", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
