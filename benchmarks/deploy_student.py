"""Issue 16's figures: the deployable student against its teacher, per scenario, through the CLI's own code paths.

For every scenario it runs the default ``fedistill simulate --scenario NAME`` (or takes ``--run NAME=RUN_DIR``), then
``fedistill export RUN_DIR --quantize int8,int4`` (serving.export: ONNX parity, the quantized files' held-out
quality, the model card and signature, checked with verify-model) and ``fedistill bench RUN_DIR`` (serving.bench:
every model in its own process, timed in interleaved blocks, every figure checked).

    .venv/bin/python benchmarks/deploy_student.py --scenarios hospitals drug-reviews \
        --json docs/benchmarks/deploy_student.json

It prints, per scenario and model: x faster at batch 1, x throughput, size ratio and the share of the teacher's
headline metric, each as measured in one run; a figure that failed its own checks prints as "untrustworthy".
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path


def simulate_default(scenario: str, out: Path) -> Path:
    from simulations.runner import SimulationOptions, simulate

    summary = simulate(SimulationOptions(scenario=scenario, out=out))
    return Path(summary["paths"]["run_dir"])


def measure(scenario: str, run_dir: Path, work: Path, threads: int) -> dict:
    from compliance.model_signature import verify_model
    from serving.bench import bench_run
    from serving.export import ExportRequest, export_run

    out = work / f"{scenario}-export"
    manifest = export_run(ExportRequest(run_dir, out, quantize=("int8", "int4")))
    verified = verify_model(out, run_dir=run_dir)
    bench = bench_run(run_dir, threads=threads)
    return {"scenario": scenario, "run_id": manifest["run_id"], "family": manifest["family"],
            "export": {key: manifest[key] for key in ("variants", "quality", "headline_metric", "heldout")},
            "verify_model": verified["verified"], "bench": bench}


def _ratio(row: dict, key: str, ratio_check: bool = True) -> str:
    problems = row["ratio_untrustworthy"] if ratio_check else row["untrustworthy"]
    return "untrustworthy" if problems or row.get(key) is None else f"{row[key]:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scenarios", nargs="+", default=["hospitals", "drug-reviews"])
    parser.add_argument("--run", action="append", default=[], help="NAME=RUN_DIR: use this finished run")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    given = dict(item.split("=", 1) for item in args.run)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for scenario in args.scenarios:
            run_dir = Path(given[scenario]) if scenario in given else simulate_default(scenario, work / "runs")
            results.append(measure(scenario, run_dir, work, args.threads))
    for result in results:
        bench = result["bench"]
        print(f"\n{result['scenario']} ({result['family']}), {bench['heldout']}; {bench['threads']} thread(s); "
              f"load {bench['machine']['load_average_before'][0]:.2f} -> {bench['machine']['load_average_after'][0]:.2f}")
        print(f"{'model':<22}{'x faster b=1':>14}{'x throughput':>14}{'size ratio':>12}{'% of teacher':>14}"
              f"{'vs fp32':>10}")
        for row in bench["rows"]:
            share = "n/a" if row["quality_share"] is None else f"{100 * row['quality_share']:.1f}%"
            change = "n/a" if row["headline_change_vs_fp32"] is None else f"{row['headline_change_vs_fp32']:+.4f}"
            print(f"{row['model']:<22}{_ratio(row, 'x_faster_batch1'):>14}{_ratio(row, 'x_throughput'):>14}"
                  f"{row['size_ratio']:>12.4f}{share:>14}{change:>10}")
        parity = result["export"]["variants"]["onnx-fp32"]["parity"]["max_abs_logit_difference"]
        print(f"ONNX parity: max |logit difference| {parity:.2e}; verify-model: {result['verify_model']}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"schema_version": 1, "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
