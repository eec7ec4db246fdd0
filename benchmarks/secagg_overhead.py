"""What Flower SecAgg+ costs a federation round: round wall time and bytes each site sends, SecAgg+ vs plain.

For two students, the demo MLP of the ``hospitals`` scenario and a ~5M-parameter MLP, and for each number
of sites (5, 10 and 20 by default), it runs the same federation twice in Flower's simulation engine
(:func:`simulations.engine.run_federation`, the project's own ClientApp and ServerApp): once with secure
aggregation (Flower SecAgg+, the project default) and once with plain aggregation
(``secure_aggregation=False``). Everything else is identical:

* sites: synthetic tabular sites (random float32 features ``x`` of width 31, random 0/1 labels; 64 train,
  16 val, 16 test records) sharing a tiny scikit-learn logistic-regression teacher, each with the default
  site policy (no caps);
* training: non-private, ``local_steps=1``, ``batch_size=16``, so a round's time is the protocol,
  the messaging and the aggregation, not the training;
* ``min_cohort=3``, every other federation setting at its default (the SecAgg+ settings are printed).

Round time is the coordinator's own ``seconds`` of each round record (from the round's query to its
checkpoint); the first round also pays for Ray's start-up and the sites' teacher caches, so the median
of rounds 2..R is reported. Bytes are counted by a client mod that wraps each site's ClientApp outside
SecAgg+: for every reply to a TRAIN message (SecAgg+ makes four TRAIN round trips per round: setup, key
shares, masked vector, unmasking shares; plain aggregation one) it sums the payload: the ``data`` of every
Array of every ArrayRecord (its ``.npy`` serialization, a 128-byte header included), and every bytes value
(or list of bytes) of every ConfigRecord. Strings, numbers and message metadata are not counted. The mod
runs inside Ray actors, so it appends one JSON line per reply to a file that the main process reads
afterwards; the mean over sites and rounds 2..R is reported.

Each site gets one CPU, so on a small machine the sites of a round take turns; that is the same for both
modes. Every configuration starts a fresh simulation (tens of seconds of start-up that no round counts).
The simulation's in-memory grid polls for replies every 0.1 s, so every round trip (plain: query and
train; SecAgg+: query and four stages) costs at least that: for a small student this floor, not the
cryptography, dominates the round time.

    .venv/bin/python benchmarks/secagg_overhead.py                          # 5, 10 and 20 sites, both students
    .venv/bin/python benchmarks/secagg_overhead.py --quick                  # smoke run: 3 sites, demo, 2 rounds
    .venv/bin/python benchmarks/secagg_overhead.py --sites 5 --students large --rounds 4 --json secagg.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import flwr
import numpy as np
from flwr.app import Context, Message, MessageType
from sklearn.linear_model import LogisticRegression

from client.site import create_site
from client.teacher import TeacherDeclaration
from coordinator.rounds import Coordinator
from distill.data import SplitData
from distill.models import build_student, save_sklearn_teacher
from protocols.config import FederationConfig, StudentSpec
from simulations.engine import run_federation

STUDENTS = {
    "demo": StudentSpec("mlp", {"input_dim": 31, "hidden": [32, 32], "num_classes": 2}),
    "large": StudentSpec("mlp", {"input_dim": 31, "hidden": [2200, 2200], "num_classes": 2}),
}
MODES = {"secagg+": True, "plain": False}
FEATURES = 31
SPLIT_SIZES = {"train": 64, "val": 16, "test": 16}
SEED = 0
QUICK = {"sites": [3], "students": ["demo"], "rounds": 2}
ModFunction = Callable[[Message, Context, Callable[[Message, Context], Message]], Message]


def random_split(records: int, rng: np.random.Generator) -> SplitData:
    return SplitData({"x": rng.standard_normal((records, FEATURES), dtype=np.float32)},
                     rng.integers(0, 2, records), np.arange(records))


def make_sites(directory: Path, count: int) -> list[Path]:
    """``count`` synthetic tabular sites sharing one tiny logistic-regression teacher; their state directories."""
    rng = np.random.default_rng(SEED)
    teacher_data = random_split(200, rng)
    teacher_path = directory / "teacher.pkl"
    save_sklearn_teacher(LogisticRegression().fit(teacher_data.inputs["x"], teacher_data.labels), teacher_path)
    return [create_site(directory / f"site-{index:02d}", f"site-{index:02d}",
                        {split: random_split(records, rng) for split, records in SPLIT_SIZES.items()},
                        teacher_path, teacher_declaration=TeacherDeclaration("public")).state_dir
            for index in range(count)]


def payload_bytes(reply: Message) -> int:
    """Array data plus bytes values (and lists of bytes) of every record of ``reply``."""
    total = sum(len(array.data) for record in reply.content.array_records.values() for array in record.values())
    for record in reply.content.config_records.values():
        for value in record.values():
            if isinstance(value, bytes):
                total += len(value)
            elif isinstance(value, list) and value and isinstance(value[0], bytes):
                total += sum(len(item) for item in value)
    return total


def reply_byte_counter(log_path: Path) -> ModFunction:
    """A client mod appending ``{"site", "round", "bytes"}`` to ``log_path`` for every reply to a TRAIN message."""
    path = str(log_path)

    def count_reply_bytes(msg: Message, context: Context, call_next: Callable[[Message, Context], Message]) -> Message:
        reply = call_next(msg, context)
        if msg.metadata.message_type == MessageType.TRAIN and not reply.has_error():
            line = json.dumps({"site": int(context.node_config["partition-id"]), "round": int(msg.metadata.group_id),
                               "bytes": payload_bytes(reply)})
            with open(path, "a", encoding="utf-8") as handle:  # one short append per line: safe across actors
                handle.write(line + "\n")
        return reply

    return count_reply_bytes


def bytes_per_site_round(log_path: Path, first_round: int) -> tuple[float, float]:
    """Mean payload bytes and mean number of TRAIN replies per (site, round), over rounds >= ``first_round``."""
    totals: dict[tuple[int, int], int] = defaultdict(int)
    replies: dict[tuple[int, int], int] = defaultdict(int)
    for line in log_path.read_text().splitlines():
        entry = json.loads(line)
        if entry["round"] >= first_round:
            totals[entry["site"], entry["round"]] += entry["bytes"]
            replies[entry["site"], entry["round"]] += 1
    return statistics.fmean(totals.values()), statistics.fmean(replies.values())


def federation_config(spec: StudentSpec, rounds: int, secure: bool) -> FederationConfig:
    return FederationConfig.from_dict({"student": spec, "rounds": rounds, "local_steps": 1, "batch_size": 16,
                                       "secure_aggregation": secure, "min_cohort": 3})


def run_configuration(spec: StudentSpec, sites: int, secure: bool, rounds: int, verbose: bool) -> dict[str, Any]:
    """One federation of ``sites`` fresh sites for ``rounds`` rounds; its steady-state round time and bytes."""
    config = federation_config(spec, rounds, secure)
    with tempfile.TemporaryDirectory(prefix="secagg-bench-") as scratch:
        directory = Path(scratch)
        state_dirs = make_sites(directory / "sites", sites)
        byte_log = directory / "reply_bytes.jsonl"
        started = time.perf_counter()
        coordinator = run_federation(state_dirs, lambda: Coordinator(config, "secagg-bench", directory / "run"),
                                     verbose=verbose, client_mods=[reply_byte_counter(byte_log)])
        total_seconds = time.perf_counter() - started
        records = coordinator.records
        not_aggregated = [(r["round"], r["status"]) for r in records if r["status"] != "aggregated"]
        if len(records) != rounds or not_aggregated:
            raise RuntimeError(f"{sites} sites, {'secagg+' if secure else 'plain'}: expected {rounds} aggregated "
                               f"rounds, got {len(records)} with failures {not_aggregated}")
        mean_bytes, replies = bytes_per_site_round(byte_log, first_round=2)
    steady = [r["seconds"] for r in records[1:]]
    return {"seconds_per_round": statistics.median(steady), "round_seconds": [r["seconds"] for r in records],
            "bytes_per_site_round": mean_bytes, "train_replies_per_site_round": replies,
            "federation_seconds": total_seconds}


def parameter_count(spec: StudentSpec) -> int:
    return sum(p.numel() for p in build_student(spec).parameters())


def peak_rss_mib() -> float:
    """This (coordinator) process's peak resident set size; Ray's site actors are separate processes."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def ratios(comparison: dict[str, Any]) -> dict[str, float]:
    """SecAgg+ over plain, for round time and for bytes per site per round."""
    secure, plain = comparison["secagg+"], comparison["plain"]
    return {"seconds_ratio": secure["seconds_per_round"] / plain["seconds_per_round"],
            "bytes_ratio": secure["bytes_per_site_round"] / plain["bytes_per_site_round"]}


def print_table(comparisons: list[dict[str, Any]]) -> None:
    header = f"{'student':<8} {'params':>10} {'sites':>5} {'mode':<8} {'s/round':>9} {'bytes/site/round':>17}"
    print(header)
    print("-" * len(header))
    for comparison in comparisons:
        for mode in MODES:
            result = comparison[mode]
            print(f"{comparison['student']:<8} {comparison['params']:>10,} {comparison['sites']:>5} {mode:<8} "
                  f"{result['seconds_per_round']:>9.3f} {result['bytes_per_site_round']:>17,.0f}")
        print(f"{'':<8} {'':>10} {'':>5} {'ratio':<8} {comparison['seconds_ratio']:>8.2f}x "
              f"{comparison['bytes_ratio']:>16.2f}x")


def parse_arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sites", nargs="+", type=int, default=[5, 10, 20], help="site counts (each >= 3)")
    parser.add_argument("--students", nargs="+", choices=sorted(STUDENTS), default=list(STUDENTS))
    parser.add_argument("--rounds", type=int, default=3, help="rounds per federation (>= 2; round 1 is not timed)")
    parser.add_argument("--json", type=Path, help="also write the results and settings to this JSON file")
    parser.add_argument("--verbose", action="store_true", help="show Flower's and Ray's logs")
    parser.add_argument("--quick", action="store_true",
                        help=f"smoke run: {QUICK['sites'][0]} sites, the demo student, {QUICK['rounds']} rounds "
                             "(overrides --sites, --students and --rounds)")
    arguments = parser.parse_args()
    if arguments.quick:
        arguments.sites, arguments.students, arguments.rounds = QUICK["sites"], QUICK["students"], QUICK["rounds"]
    if arguments.rounds < 2 or min(arguments.sites) < 3:
        parser.error("--rounds must be at least 2 and every --sites at least 3 (SecAgg+'s min_cohort).")
    return arguments


def main() -> None:
    arguments = parse_arguments()
    settings = federation_config(STUDENTS[arguments.students[0]], arguments.rounds, secure=True).secagg_settings()
    print(f"SecAgg+ vs plain aggregation: flwr {flwr.__version__}, {os.cpu_count()} CPU(s), 1 CPU per site, "
          f"{arguments.rounds} rounds per federation, s/round = median of rounds 2..{arguments.rounds}.")
    print(f"SecAgg+ settings: {asdict(settings)} (max_weight 1.0, min_cohort 3)")
    print("bytes/site/round: payload of every site -> coordinator TRAIN reply (arrays + bytes config values).\n",
          flush=True)
    comparisons = []
    for student in arguments.students:
        spec, params = STUDENTS[student], parameter_count(STUDENTS[student])
        print(f"student {student}: {params:,} parameters", flush=True)
        for sites in arguments.sites:
            comparison: dict[str, Any] = {"student": student, "params": params, "sites": sites}
            for mode, secure in MODES.items():
                result = comparison[mode] = run_configuration(spec, sites, secure, arguments.rounds,
                                                              arguments.verbose)
                print(f"  {sites} sites, {mode}: round seconds {result['round_seconds']}, "
                      f"{result['train_replies_per_site_round']:g} TRAIN replies/site/round, "
                      f"whole federation {result['federation_seconds']:.1f} s", flush=True)
            comparisons.append(comparison | ratios(comparison))
    print()
    print_table(comparisons)
    peak_rss = peak_rss_mib()
    print(f"\npeak RSS of the coordinator process: {peak_rss:.0f} MiB")
    if arguments.json:
        report = {"settings": {"rounds": arguments.rounds, "local_steps": 1, "batch_size": 16, "min_cohort": 3,
                               "split_sizes": SPLIT_SIZES, "features": FEATURES, "cpus_per_site": 1.0,
                               "secagg": asdict(settings), "flwr": flwr.__version__, "cpus": os.cpu_count(),
                               "python": platform.python_version(), "machine": platform.machine(),
                               "students": {name: STUDENTS[name].to_dict() for name in arguments.students}},
                  "results": comparisons, "peak_rss_mib": peak_rss}
        arguments.json.parent.mkdir(parents=True, exist_ok=True)
        arguments.json.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {arguments.json}")


if __name__ == "__main__":
    main()
