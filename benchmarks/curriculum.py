"""Issue 13's figures on the hospitals scenario: the curriculum (coordinator stage, then federated DP) against the
public-only student and the single-stage federated student, at each privacy level, over seeds.

For every (seed, epsilon) it runs ``fedistill simulate --scenario hospitals`` twice in process: once with
``--stages federated`` (today's single stage) and once with the scenario's curriculum (coordinator, federated). Each
run trains the budget-matched public-only baseline too. Forgetting: every stage's student is also scored on the
coordinator stage's public held-out records. About 100 s per run on 2 cores with plain aggregation (SecAgg+ adds
its protocol time and a bounded quantization error, nothing else):

    .venv/bin/python benchmarks/curriculum.py --seeds 0 1 2 --epsilon 3 8 --json docs/benchmarks/curriculum.json

``--keep-best`` also runs the curriculum keeping its best round by the sites' validation reports (one more run per
seed and level):

    .venv/bin/python benchmarks/curriculum.py --seeds 0 1 2 --epsilon 3 --keep-best --json docs/benchmarks/keep_best.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

from simulations.runner import SimulationOptions, simulate


def _roc(stage: dict, key: str = "evaluation") -> float | None:
    value = stage.get(key)
    return None if value is None else value["roc_auc"]


def measure(seed: int, epsilon: float, out: Path, secure_aggregation: bool, keep_best: bool) -> dict:
    base = SimulationOptions(scenario="hospitals", seed=seed, epsilon=epsilon, out=out,
                             secure_aggregation=secure_aggregation)
    single = simulate(SimulationOptions(**{**base.__dict__, "stages": ("federated",)}))
    staged = simulate(base)
    stages = {s["stage"]: s for s in staged["stages"]}
    kept = {}
    if keep_best:
        best = simulate(SimulationOptions(**{**base.__dict__, "keep_best": True}))
        kept = {"curriculum_keep_best": best["comparison"]["federated"], "kept_round": best["kept_round"]}
    return kept | {
        "seed": seed, "epsilon": epsilon,
        "teacher": staged["comparison"]["teacher"],
        "public_only": staged["comparison"]["public_only"],
        "centralized_distilled": single["comparison"]["centralized_distilled"],
        "single_stage_federated": single["comparison"]["federated"],
        "coordinator_stage": _roc(stages["coordinator"]),
        "curriculum": staged["comparison"]["federated"],
        "public_holdout": {"coordinator_stage": _roc(stages["coordinator"], "public_holdout"),
                           "after_federated": _roc(stages["federated"], "public_holdout")},
        "epsilon_spent_max": max(p["epsilon"] for p in staged["privacy"]["sites"].values()),
        "curriculum_learning_rate": json.loads((Path(staged["paths"]["run_dir"]) / "config.json").read_text()
                                               )["federation"]["learning_rate"],
    }


def _mean(rows: list[dict], key: str) -> float:
    return statistics.fmean(r[key] for r in rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epsilon", type=float, nargs="+", default=[3.0, 8.0])
    parser.add_argument("--secure-aggregation", action="store_true", help="Run every update through SecAgg+.")
    parser.add_argument("--keep-best", action="store_true", help="Also run the curriculum keeping its best round "
                                                                 "by the sites' validation reports.")
    parser.add_argument("--json", type=Path, help="Also write the rows and means here.")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as out:
        for epsilon in args.epsilon:
            for seed in args.seeds:
                rows.append(measure(seed, epsilon, Path(out), args.secure_aggregation, args.keep_best))
                r = rows[-1]
                print(f"epsilon {epsilon:g} seed {seed}: public-only {r['public_only']:.4f}, single-stage "
                      f"{r['single_stage_federated']:.4f}, coordinator stage {r['coordinator_stage']:.4f}, "
                      f"curriculum {r['curriculum']:.4f}"
                      + (f", keeping its best round {r['curriculum_keep_best']:.4f} (round {r['kept_round']})"
                         if args.keep_best else ""), flush=True)
    means = {}
    for epsilon in args.epsilon:
        level = [r for r in rows if r["epsilon"] == epsilon]
        m = {key: _mean(level, key) for key in ("teacher", "public_only", "centralized_distilled",
                                                "single_stage_federated", "coordinator_stage", "curriculum")}
        if args.keep_best:
            m["curriculum_keep_best"] = _mean(level, "curriculum_keep_best")
            m["keep_best_minus_last_round"] = m["curriculum_keep_best"] - m["curriculum"]
        m["curriculum_minus_public_only"] = m["curriculum"] - m["public_only"]
        m["curriculum_minus_single_stage"] = m["curriculum"] - m["single_stage_federated"]
        m["federated_stage_gain"] = m["curriculum"] - m["coordinator_stage"]
        m["public_holdout_change"] = statistics.fmean(
            r["public_holdout"]["after_federated"] - r["public_holdout"]["coordinator_stage"] for r in level)
        means[f"{epsilon:g}"] = m
        print(f"\nepsilon {epsilon:g} per site, mean over seeds {args.seeds} (pooled-test ROC-AUC):")
        for key, value in m.items():
            print(f"  {key:32s} {value:+.4f}" if "minus" in key or "gain" in key or "change" in key
                  else f"  {key:32s} {value:.4f}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"schema_version": 1, "scenario": "hospitals", "seeds": args.seeds,
                                         "secure_aggregation": args.secure_aggregation,
                                         "keep_best": args.keep_best, "rows": rows,
                                         "means": means}, indent=2) + "\n")


if __name__ == "__main__":
    main()
