"""Worst float64 gradient-check relative error per layer type, over the cases of the test table.

Runs every case of ``tests/test_gradcheck_layers.py::CASES`` through ``minideeplab.gradcheck.check_module``
(float64, central differences, every entry, the same seeds and options as the test) and prints one row per layer type: how many
cases, how many tensors and entries were checked, the worst relative error and the case it came from.

    .venv/bin/python benchmarks/gradcheck_report.py [--device cpu|cuda] [--all]
"""
from __future__ import annotations

import argparse
import importlib.util
import time
from pathlib import Path

import numpy as np

from minideeplab.gradcheck import check_module

TABLE = Path(__file__).resolve().parents[1] / "tests" / "test_gradcheck_layers.py"


def load_table():
    spec = importlib.util.spec_from_file_location("gradcheck_table", TABLE)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def run(device: str = "cpu"):
    """Yield (layer type, case id, GradCheckResult) for every case, built and seeded as in the test."""
    table = load_table()
    for kind, case_id, make in table.CASES:
        module, inputs = table.build(case_id, make, device)
        yield kind, case_id, check_module(module, inputs, rng=np.random.default_rng(5), raise_on_fail=False,
                                          **table.CHECK_OPTIONS)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--all", action="store_true", help="also print every case's worst error")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    per_kind: dict[str, dict] = {}
    failed = []
    for kind, case_id, result in run(args.device):
        row = per_kind.setdefault(kind, {"cases": 0, "tensors": 0, "entries": 0, "worst": 0.0, "where": "",
                                         "order": len(per_kind)})
        row["cases"] += 1
        row["tensors"] += len(result.rows)
        row["entries"] += sum(r.checked for r in result.rows)
        if result.worst >= row["worst"]:
            row["worst"], row["where"] = result.worst, case_id
        if not result.passed:
            failed.append(f"{kind}-{case_id}")
        if args.all:
            print(f"  {kind:<18} {case_id:<24} worst rel err {result.worst:.2e}")
    print(f"gradient check, float64, central differences (eps=1e-5), rtol=1e-6, device={args.device}")
    print(f"{'layer':<18} {'cases':>5} {'tensors':>7} {'entries':>7}  {'worst rel err':>13}  worst case")
    for kind, row in sorted(per_kind.items(), key=lambda kv: kv[1]["order"]):
        print(f"{kind:<18} {row['cases']:>5} {row['tensors']:>7} {row['entries']:>7}  {row['worst']:>13.2e}  "
              f"{row['where']}")
    overall = max(r["worst"] for r in per_kind.values())
    print(f"overall worst: {overall:.2e}   ({time.perf_counter() - t0:.1f} s)")
    if failed:
        print("FAILED: " + ", ".join(failed))
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
