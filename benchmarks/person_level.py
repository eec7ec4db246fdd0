"""Issue 15's figure: what person-level DP-SGD costs against record-level on the hospitals scenario, at the same
epsilon per site, through the whole federated path (Flower's simulation engine, SecAgg+, Opacus at every site).

For every (seed, epsilon, unit) it runs ``fedistill simulate --scenario hospitals --privacy-unit UNIT`` in process and
reads the run's summary: the pooled test ROC-AUC of the federated student, each site's epsilon, the units its sampling
rate was computed over (persons or records) and the guarantee a person gets (person-level: the run's epsilon; record
level: the group-privacy bound for the site's largest record count per person).

    .venv/bin/python benchmarks/person_level.py --seeds 0 --epsilon 3 8 --json docs/benchmarks/person_level.json

It prints, per (seed, epsilon), person-level ROC-AUC / record-level ROC-AUC.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

UNITS = ("person", "record")


def run(seed: int, epsilon: float, unit: str, out: Path) -> dict:
    from simulations.runner import SimulationOptions, simulate

    summary = simulate(SimulationOptions(scenario="hospitals", seed=seed, epsilon=epsilon, out=out,
                                         privacy_unit=unit))
    sites = summary["privacy"]["sites"]
    return {"seed": seed, "epsilon": epsilon, "unit": unit, "roc_auc": summary["comparison"]["federated"],
            "public_only": summary["comparison"].get("public_only"),
            "sites": {name: {"epsilon": site["epsilon"], "unit": site["unit"], "units": site["units"],
                             "sample_rate": site["sample_rate"], "noise_multiplier": site["noise_multiplier"],
                             "max_records_per_person": site["max_records_per_person"],
                             "person_guarantee": site.get("person_level")}
                      for name, site in sites.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--epsilon", type=float, nargs="+", default=[3.0, 8.0])
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            for epsilon in args.epsilon:
                for unit in UNITS:
                    rows.append(run(seed, epsilon, unit, Path(tmp)))
                    print(json.dumps({k: rows[-1][k] for k in ("seed", "epsilon", "unit", "roc_auc")}), flush=True)
    ratios = []
    for seed in args.seeds:
        for epsilon in args.epsilon:
            person, record = (next(r for r in rows if (r["seed"], r["epsilon"], r["unit"]) == (seed, epsilon, unit))
                              for unit in UNITS)
            ratios.append({"seed": seed, "epsilon": epsilon, "person_roc_auc": person["roc_auc"],
                           "record_roc_auc": record["roc_auc"],
                           "person_over_record": person["roc_auc"] / record["roc_auc"],
                           "public_only": person["public_only"]})
    print(f"{'seed':>4} {'epsilon':>7} {'person':>8} {'record':>8} {'person/record':>13} {'public-only':>11}")
    for r in ratios:
        print(f"{r['seed']:>4} {r['epsilon']:>7g} {r['person_roc_auc']:>8.4f} {r['record_roc_auc']:>8.4f} "
              f"{r['person_over_record']:>13.4f} {r['public_only'] or float('nan'):>11.4f}")
    if args.json:
        args.json.write_text(json.dumps({"schema_version": 1, "runs": rows, "ratios": ratios}, indent=2) + "\n")


if __name__ == "__main__":
    main()
