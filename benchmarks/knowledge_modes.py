"""Issue 14's figures: the three knowledge modes (weights, knowledge, hybrid) on the hospitals scenario, through the
whole federated path (Flower's simulation engine, SecAgg+, DP-SGD at each site's epsilon).

For every (seed, epsilon, mode) it runs ``fedistill simulate --scenario hospitals --knowledge-mode MODE`` in process
and reads what each run's evidence says: the pooled test ROC-AUC of the federated student; the bytes each site handed
SecAgg+ per round (its ledger's ``update-sent`` bytes: float64 values, the masked vector's layout); the coordinator's
round time (query to checkpoint, the median over rounds, server-side distillation included). It also counts, without
training, what a site sends per round for students of two sizes (10x and more apart) in each mode:

    .venv/bin/python benchmarks/knowledge_modes.py --seeds 0 --epsilon 3 --json docs/benchmarks/knowledge_modes.json
    .venv/bin/python benchmarks/knowledge_modes.py --traffic-only

Mode ``hybrid-pate`` is hybrid mode with the PATE source (client/pate.py): each site's ensemble of
``--pate-teachers`` teachers on disjoint partitions by person, released once on a proxy sample of
``--proxy-records`` public inputs with noise multiplier ``--pate-noise-multiplier``:

    .venv/bin/python benchmarks/knowledge_modes.py --epsilon 3 --modes hybrid-pate --proxy-records 64 \
        --pate-teachers 32 --pate-noise-multiplier 4

Mode ``knowledge-own`` is knowledge mode with heterogeneous students: each ``--site-student SITE=W1,W2`` site trains
its own MLP of those hidden widths (client/knowledge.py), the others the run's:

    .venv/bin/python benchmarks/knowledge_modes.py --epsilon 3 --modes knowledge-own \
        --site-student picu=128,128 --site-student nicu=16 --site-student laboratory=
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

import numpy as np

MODES = ("weights", "knowledge", "hybrid")
RUN_MODES = (*MODES, "hybrid-pate", "knowledge-own")


def traffic_by_student_size(proxy_records: int, classes: int, input_dim: int) -> list[dict]:
    """Values per site per round that each mode puts into SecAgg+, for a small and a large MLP student."""
    from coordinator.rounds import Coordinator
    from coordinator.secure_round import masked_layout
    from protocols.config import FederationConfig, StudentSpec
    from protocols.knowledge import PROXY_FILE, proxy_file_bytes
    from protocols.canonical import sha256_hex

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        proxy = proxy_file_bytes({"x": np.zeros((proxy_records, input_dim), dtype=np.float32)})
        (Path(tmp) / PROXY_FILE).write_bytes(proxy)
        for hidden in ([32, 32], [512, 512]):
            student = StudentSpec("mlp", {"input_dim": input_dim, "hidden": hidden, "num_classes": classes})
            for mode in MODES:
                knowledge = None if mode == "weights" else {
                    "mode": mode, "source": "local-student", "proxy_digest": sha256_hex(proxy),
                    "proxy_records": proxy_records, "classes": classes}
                config = FederationConfig.from_dict({"student": student, "knowledge": knowledge})
                coordinator = Coordinator(config, f"traffic-{mode}", Path(tmp) / f"{mode}-{hidden[0]}",
                                          proxy_path=Path(tmp) / PROXY_FILE if knowledge else None)
                layout = masked_layout([v.shape for v in coordinator.secure_payload(coordinator.instruction(1))
                                        .values()])
                values = sum(int(np.prod(shape)) for shape in layout) - 1  # Flower's own weight factor aside
                rows.append({"student_hidden": hidden,
                             "student_parameters": int(sum(v.size for v in coordinator.state.values())),
                             "mode": mode, "values_per_round": values, "secagg_input_bytes": 8 * values})
    return rows


def traffic_and_round_time(run_dir: Path) -> tuple[list[int], float]:
    """Every update's bytes as the sites' ledgers record them, and the coordinator's median round time."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    sent = []
    for ledger in sorted((run_dir / "sites").glob("*/ledger.jsonl")):
        events = [json.loads(line) for line in ledger.read_text().splitlines()]
        sent += [e["payload"]["bytes"] for e in events if e["kind"] == "update-sent"]
    return sent, statistics.median(r["seconds"] for r in records)


def measure(seed: int, epsilon: float, mode: str, out: Path, rounds: int | None, pate: dict, server: dict,
            own: dict) -> dict:
    from simulations.runner import SimulationOptions, simulate

    source = {"knowledge_mode": "hybrid", "knowledge_source": "pate", **pate} if mode == "hybrid-pate" else {
        "knowledge_mode": mode}
    source |= server if mode != "weights" else {}
    if mode == "knowledge-own":
        source = {**source, "knowledge_mode": "knowledge", "site_students": own}
    summary = simulate(SimulationOptions(scenario="hospitals", seed=seed, epsilon=epsilon, out=out, rounds=rounds,
                                         **source))
    run_dir = Path(summary["paths"]["run_dir"])
    sent, seconds = traffic_and_round_time(run_dir)
    return {"seed": seed, "epsilon": epsilon, "mode": mode, "roc_auc": summary["comparison"]["federated"],
            "public_only": summary["comparison"].get("public_only"),
            "bytes_per_site_round": statistics.median(sent) if sent else None,
            "seconds_per_round": seconds,
            "epsilon_spent_max": max(p["epsilon"] for p in summary["privacy"]["sites"].values()),
            "run_dir": run_dir.name, **({"pate": pate} if mode == "hybrid-pate" else {}),
            **({"server": server} if server and mode != "weights" else {}),
            **({"site_students": {site: list(widths) for site, widths in own.items()}}
               if mode == "knowledge-own" else {})}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="*", default=[0])
    parser.add_argument("--epsilon", type=float, nargs="*", default=[1.0, 3.0, 8.0])
    parser.add_argument("--modes", nargs="*", default=list(MODES), choices=RUN_MODES)
    parser.add_argument("--proxy-records", type=int, default=64, help="hybrid-pate: the proxy sample's size")
    parser.add_argument("--pate-teachers", type=int, default=32)
    parser.add_argument("--pate-noise-multiplier", type=float, default=4.0)
    parser.add_argument("--site-student", action="append", default=[], help="knowledge-own: SITE=W1,W2")
    parser.add_argument("--server-steps", type=int, help="the coordinator's distillation steps (default 200)")
    parser.add_argument("--server-learning-rate", type=float, help="its learning rate (default 1e-3)")
    parser.add_argument("--rounds", type=int, help="default: the scenario's")
    parser.add_argument("--out", type=Path, default=Path("runs"))
    parser.add_argument("--traffic-only", action="store_true")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    # The hospitals scenario's proxy set: its public reference inputs (31 features, 2 classes).
    from simulations.scenario import ScenarioOptions
    from simulations.scenarios import load_scenario

    scenario = load_scenario("hospitals", ScenarioOptions())
    traffic = traffic_by_student_size(len(scenario.public), len(scenario.class_names),
                                      scenario.public.inputs["x"].shape[1])
    for row in traffic:
        print(f"student {row['student_hidden']} ({row['student_parameters']:,} parameters), {row['mode']}: "
              f"{row['secagg_input_bytes']:,} bytes per site per round")
    for mode in MODES:
        small, large = [r for r in traffic if r["mode"] == mode]
        print(f"{mode}: student size x{large['student_parameters'] / small['student_parameters']:.1f} -> bytes "
              f"x{large['secagg_input_bytes'] / small['secagg_input_bytes']:.2f}")
    pate = {"proxy_records": args.proxy_records, "pate_teachers": args.pate_teachers,
            "pate_noise_multiplier": args.pate_noise_multiplier}
    server = {name: value for name, value in (("server_steps", args.server_steps),
                                              ("server_learning_rate", args.server_learning_rate))
              if value is not None}
    from fedistill.simulate import parse_site_students

    own = parse_site_students(args.site_student)
    runs = [] if args.traffic_only else [measure(seed, epsilon, mode, args.out, args.rounds, pate, server, own)
                                         for seed in args.seeds for epsilon in args.epsilon for mode in args.modes]
    for row in runs:
        print(f"seed {row['seed']}, epsilon {row['epsilon']:g}, {row['mode']}: ROC-AUC {row['roc_auc']:.4f} "
              f"(public-only {row['public_only']}), {row['bytes_per_site_round']:,.0f} bytes per site per round, "
              f"{row['seconds_per_round']:.2f} s per round, epsilon spent {row['epsilon_spent_max']:.3f}")
    for epsilon in args.epsilon:
        weights = [r["roc_auc"] for r in runs if r["epsilon"] == epsilon and r["mode"] == "weights"]
        for mode in RUN_MODES[1:]:
            other = [r["roc_auc"] for r in runs if r["epsilon"] == epsilon and r["mode"] == mode]
            if weights and other and len(weights) == len(other):
                print(f"epsilon {epsilon:g}: {mode} minus weights ROC-AUC, mean over {len(other)} seed(s): "
                      f"{statistics.mean(o - w for o, w in zip(other, weights)):+.4f}")
    if args.json:
        args.json.write_text(json.dumps({"schema_version": 1, "traffic": traffic, "runs": runs}, indent=2) + "\n")


if __name__ == "__main__":
    main()
