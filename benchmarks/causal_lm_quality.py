"""Issue 12's done-when figures on the health-tweets scenario: the federated student at epsilon 8 per site against
the undistilled, the public-only and the centrally distilled student, over seeds; its size and speed against the
teacher.

Runs ``fedistill simulate --scenario health-tweets --preset full`` once per seed (about 25 minutes each on 2 cores,
plus about 20 for the public stage the first time),
or reads the summaries of runs made already, and prints the ratios:

    .venv/bin/python benchmarks/causal_lm_quality.py --seeds 0 1 --json docs/benchmarks/causal_lm_quality.json
    .venv/bin/python benchmarks/causal_lm_quality.py --runs runs/<run-seed0> runs/<run-seed1>
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from simulations.runner import SimulationOptions, simulate


def row(summary: dict) -> dict:
    models, size = summary["models"], summary["size"]
    perplexity = {key: models[key]["overall"]["perplexity"] for key in summary["model_labels"]}
    return {"seed": summary["seed"], "run_dir": Path(summary["paths"]["run_dir"]).name, "perplexity": perplexity,
            "top1_agreement": {key: models[key]["overall"]["top1_agreement"] for key in summary["model_labels"]},
            "federated_over_undistilled": perplexity["federated"] / perplexity["undistilled"],
            "federated_over_centralized": perplexity["federated"] / perplexity["centralized_distilled"],
            # Against a central curator under DP at the same epsilon: what federation alone costs.
            "federated_over_centralized_private": (perplexity["federated"] / perplexity["centralized_private"]
                                                   if "centralized_private" in perplexity else None),
            # After the coordinator's public stage: what the sites' private texts added to the free alternative.
            "federated_over_public_only": (perplexity["federated"] / perplexity["public_only"]
                                           if "public_only" in perplexity else None),
            "public_stage": summary["causal_lm"].get("public_stage"),
            "epsilon": {site: p["epsilon"] for site, p in summary["privacy"]["sites"].items()},
            "non_embedding_ratio": size["non_embedding_ratio"],
            "speedup_per_generated_token": size["latency_ms_per_token"]["speedup"],
            "seconds": summary["seconds"]["total"]}


def spread(values: list[float]) -> str:
    return f"{statistics.mean(values):.4g} [{min(values):.4g}, {max(values):.4g}]"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="*", default=[0, 1])
    parser.add_argument("--preset", default="full")
    parser.add_argument("--out", type=Path, default=Path("runs"))
    parser.add_argument("--runs", type=Path, nargs="*", help="summarise these run directories instead of running")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if args.runs:
        summaries = [json.loads((run / "summary.json").read_text()) for run in args.runs]
    else:
        summaries = [simulate(SimulationOptions(scenario="health-tweets", preset=args.preset, seed=seed, out=args.out))
                     for seed in args.seeds]
    rows = [row(s) for s in summaries]
    for r in rows:
        p = r["perplexity"]
        print(f"seed {r['seed']}: perplexity teacher {p['teacher']:.1f}, federated {p['federated']:.1f}, undistilled "
              f"{p['undistilled']:.4g}, centralized {p['centralized_distilled']:.1f}; federated / undistilled "
              f"{r['federated_over_undistilled']:.3g}, federated / centralized {r['federated_over_centralized']:.3f}"
              + (f", public-only {p['public_only']:.1f}, federated / public-only "
                 f"{r['federated_over_public_only']:.3f}" if r["federated_over_public_only"] else "")
              + f"; epsilon {max(r['epsilon'].values()):.3f}; {r['seconds']:.0f} s")
    print(f"federated / undistilled perplexity, mean [min, max] over {len(rows)} seed(s): "
          f"{spread([r['federated_over_undistilled'] for r in rows])}")
    print(f"federated / centralized distilled perplexity: {spread([r['federated_over_centralized'] for r in rows])}")
    if all(r["federated_over_centralized_private"] for r in rows):
        print(f"federated / centralized distilled at the same epsilon: "
              f"{spread([r['federated_over_centralized_private'] for r in rows])}")
    if all(r["federated_over_public_only"] for r in rows):
        print(f"federated / public-only perplexity: {spread([r['federated_over_public_only'] for r in rows])}")
    print(f"student / teacher non-embedding parameters: {rows[0]['non_embedding_ratio']:.3f}; teacher / student CPU "
          f"time per generated token: {spread([r['speedup_per_generated_token'] for r in rows])}")
    if args.json:
        args.json.write_text(json.dumps({"schema_version": 1, "preset": args.preset, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
