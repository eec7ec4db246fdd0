"""Issue 13's continuing runs on the hospitals scenario: new records arrive after a run, with and without replay.

For every (seed, epsilon): a first run (the scenario's curriculum: coordinator stage, then federated DP) sees half
of each site's persons (``--data-share 0.5``). Then three runs continue it with ``--from``, once all records have
arrived:

- ``incremental``: each site trains only on its new records (``--incremental``);
- ``incremental_replay``: the same, plus its replay buffer of earlier teacher-hard records
  (``--replay-min-entropy``);
- ``full``: every record again (``--from`` alone).

Printed per run: pooled-test ROC-AUC, the records the sites trained on, and the largest lifetime epsilon a site holds
after both runs (the budgets compose). About 100 s per run on 2 cores with plain aggregation:

    .venv/bin/python benchmarks/incremental.py --seeds 0 1 2 --epsilon 3 --json docs/benchmarks/incremental.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from dataclasses import replace
from pathlib import Path

from simulations.runner import SimulationOptions, reusable_baselines, simulate

VARIANTS = ("incremental", "incremental_replay", "full")


def _trained(summary: dict) -> int:
    return sum(site.get("training_set", {}).get("trained_on", 0) for site in summary["privacy"]["sites"].values())


def _lifetime(summary: dict) -> float:
    return max(site["epsilon_lifetime"] for site in summary["privacy"]["sites"].values())


def measure(seed: int, epsilon: float, replay_min_entropy: float, out: Path) -> dict:
    base = SimulationOptions(scenario="hospitals", seed=seed, epsilon=epsilon, out=out, secure_aggregation=False)
    first = simulate(replace(base, data_share=0.5))
    start = Path(first["paths"]["run_dir"])
    runs = {"incremental": replace(base, from_run=start, incremental=True),
            "incremental_replay": replace(base, from_run=start, incremental=True,
                                          replay_min_entropy=replay_min_entropy),
            "full": replace(base, from_run=start)}
    row = {"seed": seed, "epsilon": epsilon, "replay_min_entropy": replay_min_entropy,
           "first_run": first["comparison"]["federated"], "first_run_records": _trained(first)}
    baselines = None
    for name, options in runs.items():
        summary = simulate(options, baselines=baselines)
        # The continuing runs share their splits, so their (non-private) baselines are trained once.
        baselines = baselines or reusable_baselines(summary)
        row[name] = {"roc_auc": summary["comparison"]["federated"], "records_trained": _trained(summary),
                     "replayed": sum(s.get("training_set", {}).get("replay", 0)
                                     for s in summary["privacy"]["sites"].values()),
                     "lifetime_epsilon_max": _lifetime(summary)}
    row["public_only"] = summary["comparison"]["public_only"]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epsilon", type=float, nargs="+", default=[3.0])
    parser.add_argument("--replay-min-entropy", type=float, default=0.3)
    parser.add_argument("--json", type=Path, help="Also write the rows and means here.")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as out:
        for epsilon in args.epsilon:
            for seed in args.seeds:
                rows.append(measure(seed, epsilon, args.replay_min_entropy, Path(out)))
                r = rows[-1]
                print(f"epsilon {epsilon:g} seed {seed}: first run (half the persons) {r['first_run']:.4f}; then "
                      + ", ".join(f"{v} {r[v]['roc_auc']:.4f} on {r[v]['records_trained']} records"
                                  for v in VARIANTS), flush=True)
    means = {}
    for epsilon in args.epsilon:
        level = [r for r in rows if r["epsilon"] == epsilon]
        m = {"first_run": statistics.fmean(r["first_run"] for r in level),
             "public_only": statistics.fmean(r["public_only"] for r in level)}
        for variant in VARIANTS:
            m[variant] = statistics.fmean(r[variant]["roc_auc"] for r in level)
            m[f"{variant}_records_share"] = statistics.fmean(r[variant]["records_trained"]
                                                             / r["full"]["records_trained"] for r in level)
            m[f"{variant}_lifetime_epsilon_max"] = max(r[variant]["lifetime_epsilon_max"] for r in level)
        m["replay_minus_no_replay"] = m["incremental_replay"] - m["incremental"]
        m["replay_minus_full"] = m["incremental_replay"] - m["full"]
        means[f"{epsilon:g}"] = m
        print(f"\nepsilon {epsilon:g} per site and run, mean over seeds {args.seeds}:")
        for key, value in m.items():
            print(f"  {key:38s} {value:+.4f}" if "minus" in key else f"  {key:38s} {value:.4f}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"schema_version": 1, "scenario": "hospitals", "seeds": args.seeds,
                                         "rows": rows, "means": means}, indent=2) + "\n")


if __name__ == "__main__":
    main()
