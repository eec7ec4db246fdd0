"""Issue 14's figures on a text path: the three knowledge modes on the health-tweets causal-LM scenario, through the
whole federated path (Flower's simulation engine, SecAgg+, DP-SGD at each site's epsilon).

For every (seed, epsilon, mode) it runs ``fedistill simulate --scenario health-tweets --preset PRESET
--knowledge-mode MODE`` in process and reads each run's evidence: the federated student's held-out perplexity
(pooled over the sites' newest tweets), the public-only student's, the bytes each site handed SecAgg+ per round (its
ledger's ``update-sent`` bytes: float64 values), and the coordinator's median round time (query to checkpoint,
server-side distillation included). In ``knowledge`` mode a site sends only its next-token release on the public proxy
prompts (distill/causal_knowledge.py), whatever the student:

    .venv/bin/python benchmarks/knowledge_text.py --preset smoke --epsilon 1 3 8 --json docs/benchmarks/knowledge_text.json
    .venv/bin/python benchmarks/knowledge_text.py --preset tiny --epsilon 8 --server-steps 30
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from knowledge_modes import traffic_and_round_time  # this folder: the scripts run from it

MODES = ("weights", "knowledge", "hybrid")


def measure(preset: str, seed: int, epsilon: float, mode: str, out: Path, shared_tokens: int,
            server_steps: int | None) -> dict:
    from simulations.runner import SimulationOptions, simulate

    server = {"server_steps": server_steps} if server_steps is not None and mode != "weights" else {}
    summary = simulate(SimulationOptions(scenario="health-tweets", preset=preset, seed=seed, epsilon=epsilon, out=out,
                                         knowledge_mode=mode, shared_tokens=shared_tokens, **server))
    run_dir = Path(summary["paths"]["run_dir"])
    sent, seconds = traffic_and_round_time(run_dir)
    models = summary["models"]
    knowledge = json.loads((run_dir / "config.json").read_text())["federation"].get("knowledge")
    return {"preset": preset, "seed": seed, "epsilon": epsilon, "mode": mode, **server,
            "perplexity": models["federated"]["overall"]["perplexity"],
            "public_only_perplexity": models["public_only"]["overall"]["perplexity"],
            "top1_agreement": models["federated"]["overall"]["top1_agreement"],
            "bytes_per_site_round": statistics.median(sent) if sent else None,
            "release_layout": None if knowledge is None else [knowledge["proxy_positions"], knowledge["classes"]],
            "seconds_per_round": seconds,
            "epsilon_spent_max": max(p["epsilon"] for p in summary["privacy"]["sites"].values()),
            "run_dir": run_dir.name}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="smoke")
    parser.add_argument("--seeds", type=int, nargs="*", default=[0])
    parser.add_argument("--epsilon", type=float, nargs="*", default=[1.0, 3.0, 8.0])
    parser.add_argument("--modes", nargs="*", default=list(MODES), choices=MODES)
    parser.add_argument("--shared-tokens", type=int, default=63)
    parser.add_argument("--server-steps", type=int, help="the coordinator's KD steps per round (default 200)")
    parser.add_argument("--out", type=Path, default=Path("runs"))
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    runs = []
    for seed in args.seeds:
        for epsilon in args.epsilon:
            for mode in args.modes:
                row = measure(args.preset, seed, epsilon, mode, args.out, args.shared_tokens, args.server_steps)
                runs.append(row)
                print(f"{args.preset}, seed {seed}, epsilon {epsilon:g}, {mode}: perplexity {row['perplexity']:.2f} "
                      f"(public-only {row['public_only_perplexity']:.2f}), {row['bytes_per_site_round']:,.0f} bytes "
                      f"per site per round, {row['seconds_per_round']:.2f} s per round, epsilon spent "
                      f"{row['epsilon_spent_max']:.3f}", flush=True)
    for epsilon in args.epsilon:
        weights = [r for r in runs if r["epsilon"] == epsilon and r["mode"] == "weights"]
        for mode in MODES[1:]:
            other = [r for r in runs if r["epsilon"] == epsilon and r["mode"] == mode]
            if weights and len(weights) == len(other):
                pairs = list(zip(other, weights))
                quality = statistics.mean(o["perplexity"] / w["perplexity"] for o, w in pairs)
                traffic = statistics.mean(o["bytes_per_site_round"] / w["bytes_per_site_round"] for o, w in pairs)
                print(f"epsilon {epsilon:g}: {mode} / weights, mean over {len(pairs)} seed(s): perplexity "
                      f"{quality:.3f}, bytes {traffic:.3f}x")
    if args.json:
        args.json.write_text(json.dumps({"schema_version": 1, "runs": runs}, indent=2) + "\n")


if __name__ == "__main__":
    main()
