"""Run every benchmarks/bench_*.py and write results.json and RESULTS.md.

Each bench module defines `run(args) -> dict` with at least `name`, `title`,
`columns` and `rows` (strings), optionally `description` and any raw `data`,
and may define `add_arguments(parser)` for its own options (prefix them with
its name). `python benchmarks/run.py --only precision` runs one; `--quick` asks the
benches that read `args.quick` for their small sizes.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import json
import os
import sys
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import burnish  # noqa: E402,F401  (before mlx: BLAS routing)
from burnish.backend import device_info  # noqa: E402


def discover() -> list:
    return [importlib.import_module(p.stem) for p in sorted(HERE.glob("bench_*.py"))]


def markdown(header: dict, results: list) -> str:
    lines = ["# Benchmarks", "",
             f"Run {header['date']} on {header['machine']}; MLX {header['mlx_version']} "
             f"({header['backend']}), mlx-lm {header['mlx_lm_version']}; "
             f"BLAS: {header['blas']}. Load average (1 min) "
             f"{header['load_average_start']} at the start, "
             f"{header['load_average_end']} at the end.", ""]
    if header.get("bf16_note"):
        lines += [f"Note: {header['bf16_note']}.", ""]
    for result in results:
        lines += [f"## {result['title']}", ""]
        if result.get("run_date"):
            lines += [f"(From an earlier run, {result['run_date']}.)", ""]
        if result.get("error"):
            lines += [f"Failed: `{result['error']}`", ""]
            continue
        if result.get("description"):
            lines += [result["description"], ""]
        columns = result["columns"]
        lines.append("| " + " | ".join(columns) + " |")
        lines.append("|" + "|".join(["---"] + ["--:"] * (len(columns) - 1)) + "|")
        lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in result["rows"]]
        lines += ["", f"({result['seconds']:.0f} s)", ""]
    return "\n".join(lines)


def merge_previous(path: Path, results: list) -> list:
    """`results` plus the earlier results in `path` of benches not rerun now
    (each keeps its own date in `run_date`)."""
    if not path.exists():
        return results
    try:
        old = json.loads(path.read_text())
    except (OSError, ValueError):
        return results
    names = {r["name"] for r in results}
    date = old.get("header", {}).get("date")
    kept = [{**r, "run_date": r.get("run_date", date)} for r in old.get("results", [])
            if r.get("name") not in names]
    return sorted(kept + results, key=lambda r: r.get("name", ""))


def main(argv=None) -> int:
    modules = discover()
    parser = argparse.ArgumentParser(description="burnish benchmarks")
    parser.add_argument("--only", nargs="*", help="bench names to run (default: all)")
    parser.add_argument("--out", type=Path, default=HERE, help="where results go")
    parser.add_argument("--quick", action="store_true",
                        help="smaller sizes where a bench has them (a few minutes on a 2-core CPU)")
    for module in modules:
        if hasattr(module, "add_arguments"):
            module.add_arguments(parser)
    args = parser.parse_args(argv)

    import mlx.core as mx
    import mlx_lm

    info = device_info()
    header = {
        "date": datetime.date.today().isoformat(),
        "machine": f"{info['platform']}, {info['cpu_count']} CPUs, {info['device']}",
        "mlx_version": info["mlx_version"], "mlx_lm_version": mlx_lm.__version__,
        "backend": info["backend"], "blas": info["blas"], "bf16_note": info["bf16_note"],
        "device_info": info,
        "load_average_start": round(os.getloadavg()[0], 2),
    }
    results, failed = [], False
    for module in modules:
        name = getattr(module, "NAME", module.__name__.removeprefix("bench_"))
        if args.only and name not in args.only:
            continue
        print(f"== {name}", flush=True)
        start = time.perf_counter()
        try:
            result = module.run(args)
        except Exception as exc:  # one broken bench must not hide the others
            traceback.print_exc()
            result, failed = {"name": name, "title": name, "error": repr(exc)}, True
        result["seconds"] = time.perf_counter() - start
        results.append(result)
        mx.clear_cache()
    header["load_average_end"] = round(os.getloadavg()[0], 2)
    args.out.mkdir(parents=True, exist_ok=True)
    # keep the last results of benches (or sizes) not run now, with their dates
    results = merge_previous(args.out / "results.json", results)
    (args.out / "results.json").write_text(
        json.dumps({"header": header, "results": results}, indent=2, default=str))
    text = markdown(header, results)
    (args.out / "RESULTS.md").write_text(text + "\n")
    print(text)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
