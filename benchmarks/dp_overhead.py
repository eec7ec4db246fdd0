"""What DP-SGD costs in student training speed: non-private vs Opacus "hooks" vs Opacus "ghost" clipping.

For two students, the demo MLP of the ``hospitals`` scenario and the two-layer BERT of the ``drug-reviews``
scenario, it times the project's own training functions on random data of the right shapes:

* ``non-private``: :func:`distill.train.distill` (shuffled mini-batches of exactly ``batch`` records);
* ``hooks`` and ``ghost``: :func:`client.privacy.private_distill` with that ``grad_sample_mode``
  (Opacus per-sample gradients through hooks, or fast gradient clipping with ghost norms).

Every mode takes the same number of steps at the same batch size on the same data, starting each call
from a freshly built student with the same seed. DP-SGD samples batches by Poisson sampling, so its batch
size varies around ``batch``; samples per second count ``steps * batch`` (the expected number of samples)
for the DP modes and ``steps * batch`` (the exact number) for non-private training. Each mode gets one
short warm-up call, then ``--repeats`` timed pairs of calls, one of ``steps`` and one of ``2 * steps``
steps. Their difference is the steady-state cost of ``steps`` steps (reported as samples/s, with its
ratio to non-private); what is left of the short call is the per-call setup (for DP: the PrivacyEngine,
``make_private`` and ``cleanup``), which a site pays once per round and which is reported separately.

Torch runs on ``--threads`` threads: by default all of the machine's cores, as a site trains; pass
``--threads 1`` for numbers that compare across machines.

    .venv/bin/python benchmarks/dp_overhead.py                    # full run, both students
    .venv/bin/python benchmarks/dp_overhead.py --quick            # smoke run: few steps, one repeat
    .venv/bin/python benchmarks/dp_overhead.py --students bert --repeats 5 --json dp_overhead.json
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import opacus
import torch
from torch import nn

from client.budget import sample_rate
from client.privacy import private_distill
from distill.data import SplitData
from distill.models import build_student
from distill.train import TrainSettings, distill
from protocols.accounting import Calibration
from protocols.config import StudentSpec
from simulations.drug_reviews import CLASS_NAMES as DRUG_REVIEW_CLASSES
from simulations.drug_reviews import MAX_LENGTH as DRUG_REVIEW_SEQUENCE_LENGTH

MODES = ("non-private", "hooks", "ghost")
# tokenizer.vocab_size of all-MiniLM-L6-v2's uncased WordPiece, which the drug-reviews student is built with.
MINILM_VOCAB_SIZE = 30522
# Records in the benchmark split, as a multiple of the batch size: the Poisson rate is then exactly
# batch / records, so a DP step samples ``batch`` records in expectation.
BATCHES_PER_EPOCH = 16
SEED = 0
QUICK_STEPS = {"mlp": 20, "bert": 3}


@dataclass(frozen=True)
class StudentBenchmark:
    """A student as a scenario builds it, its training hyperparameters, and how to make random data for it."""

    name: str
    spec: StudentSpec
    num_classes: int
    optimizer: str
    learning_rate: float
    steps: int
    batch_size: int
    random_inputs: Callable[[int, np.random.Generator], dict[str, np.ndarray]]


def random_tabular_inputs(records: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    return {"x": rng.standard_normal((records, 31), dtype=np.float32)}


def random_text_inputs(records: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    shape = (records, DRUG_REVIEW_SEQUENCE_LENGTH)
    return {"input_ids": rng.integers(0, MINILM_VOCAB_SIZE, shape, dtype=np.int64),
            "attention_mask": np.ones(shape, dtype=np.int64)}


# Optimizer, learning rate and batch are the scenarios' federation defaults (hospitals: SGD 0.3, batch 256;
# drug-reviews: Adam 1e-3).
STUDENTS = {
    "mlp": StudentBenchmark(
        name="mlp", spec=StudentSpec("mlp", {"input_dim": 31, "hidden": [32, 32], "num_classes": 2}),
        num_classes=2, optimizer="sgd", learning_rate=0.3, steps=100, batch_size=256,
        random_inputs=random_tabular_inputs),
    "bert": StudentBenchmark(
        name="bert",
        spec=StudentSpec("bert", {"vocab_size": MINILM_VOCAB_SIZE, "hidden_size": 64, "num_hidden_layers": 2,
                                  "num_attention_heads": 2, "intermediate_size": 128,
                                  "max_position_embeddings": DRUG_REVIEW_SEQUENCE_LENGTH,
                                  "num_labels": len(DRUG_REVIEW_CLASSES)}),
        num_classes=len(DRUG_REVIEW_CLASSES), optimizer="adam", learning_rate=1e-3, steps=24, batch_size=32,
        random_inputs=random_text_inputs),
}


def fresh_student(spec: StudentSpec) -> nn.Module:
    torch.manual_seed(SEED)
    return build_student(spec)


def random_split(student: StudentBenchmark, records: int) -> tuple[SplitData, np.ndarray]:
    """Random inputs, labels and teacher logits for ``records`` records."""
    rng = np.random.default_rng(SEED)
    data = SplitData(student.random_inputs(records, rng), rng.integers(0, student.num_classes, records))
    teacher_logits = rng.standard_normal((records, student.num_classes), dtype=np.float32)
    return data, teacher_logits


def train_once(student: StudentBenchmark, mode: str, data: SplitData, teacher_logits: np.ndarray,
               steps: int) -> float:
    """Seconds one training call of ``steps`` steps takes in ``mode`` on a freshly built student."""
    settings = TrainSettings(steps=steps, batch_size=student.batch_size, learning_rate=student.learning_rate,
                             temperature=2.0, alpha=0.5, seed=SEED, optimizer=student.optimizer)
    model = fresh_student(student.spec)
    if mode == "non-private":
        start = time.perf_counter()
        distill(model, student.spec.family, data, teacher_logits, settings, trainable=None)
        return time.perf_counter() - start
    calibration = Calibration(run_id="bench", target_epsilon=8.0, delta=1e-5, noise_multiplier=1.0,
                              sample_rate=sample_rate(len(data), student.batch_size), planned_steps=steps,
                              batch_size=student.batch_size, max_grad_norm=1.0, records=len(data),
                              accountant="prv")
    start = time.perf_counter()
    private_distill(model, student.spec.family, data, teacher_logits, settings, trainable=None,
                    calibration=calibration, grad_sample_mode=mode, prior=[], run_id="bench", server_round=1,
                    secret_seed=SEED)
    return time.perf_counter() - start


def benchmark_student(student: StudentBenchmark, repeats: int) -> list[dict[str, Any]]:
    """One row per mode: median steady-state samples per second and per-call setup over ``repeats`` pairs.

    The modes take turns within each repeat, so a slow spell of a shared machine hits them alike.
    """
    data, teacher_logits = random_split(student, student.batch_size * BATCHES_PER_EPOCH)
    samples = student.steps * student.batch_size
    for mode in MODES:
        train_once(student, mode, data, teacher_logits, max(1, student.steps // 5))
    throughputs: dict[str, list[float]] = {mode: [] for mode in MODES}
    setups: dict[str, list[float]] = {mode: [] for mode in MODES}
    for _ in range(repeats):
        for mode in MODES:
            short = train_once(student, mode, data, teacher_logits, student.steps)
            long = train_once(student, mode, data, teacher_logits, 2 * student.steps)
            throughputs[mode].append(samples / (long - short))
            setups[mode].append(max(0.0, short - (long - short)))
    rows = [{"student": student.name, "mode": mode, "steps": student.steps, "batch_size": student.batch_size,
             "samples_per_call": samples, "samples_per_second": statistics.median(throughputs[mode]),
             "samples_per_second_each_repeat": throughputs[mode],
             "setup_seconds_per_call": statistics.median(setups[mode])} for mode in MODES]
    baseline = rows[0]["samples_per_second"]
    for row in rows:
        row["ratio_to_non_private"] = row["samples_per_second"] / baseline
    return rows


def peak_rss_mib() -> float:
    """The process's peak resident set size so far (ru_maxrss is KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def print_table(rows: list[dict[str, Any]]) -> None:
    header = (f"{'student':<8} {'mode':<12} {'steps':>5} {'batch':>5} {'samples/s':>11} {'vs non-private':>15} "
              f"{'setup s/call':>13}")
    print(header)
    print("-" * len(header))
    for row in rows:
        print(f"{row['student']:<8} {row['mode']:<12} {row['steps']:>5} {row['batch_size']:>5} "
              f"{row['samples_per_second']:>11.1f} {row['ratio_to_non_private']:>14.3f}x "
              f"{row['setup_seconds_per_call']:>13.3f}")


def parse_arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--students", nargs="+", choices=sorted(STUDENTS), default=list(STUDENTS),
                        help="which students to benchmark (default: all)")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per mode; the median is reported")
    parser.add_argument("--mlp-steps", type=int, default=STUDENTS["mlp"].steps)
    parser.add_argument("--mlp-batch-size", type=int, default=STUDENTS["mlp"].batch_size)
    parser.add_argument("--bert-steps", type=int, default=STUDENTS["bert"].steps)
    parser.add_argument("--bert-batch-size", type=int, default=STUDENTS["bert"].batch_size)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(),
                        help="torch intra-op threads (default: all cores, as a site trains)")
    parser.add_argument("--json", type=Path, help="also write the results and settings to this JSON file")
    parser.add_argument("--quick", action="store_true",
                        help=f"smoke run: {QUICK_STEPS['mlp']} MLP steps, {QUICK_STEPS['bert']} BERT steps, "
                             "1 repeat (overrides the step and repeat options)")
    return parser.parse_args()


def chosen_students(arguments: argparse.Namespace) -> list[StudentBenchmark]:
    chosen = []
    for name in arguments.students:
        steps = QUICK_STEPS[name] if arguments.quick else getattr(arguments, f"{name}_steps")
        chosen.append(replace(STUDENTS[name], steps=steps, batch_size=getattr(arguments, f"{name}_batch_size")))
    return chosen


def main() -> None:
    arguments = parse_arguments()
    repeats = 1 if arguments.quick else arguments.repeats
    torch.set_num_threads(arguments.threads)
    students = chosen_students(arguments)
    print(f"DP-SGD overhead in student training: torch {torch.__version__}, opacus {opacus.__version__}, "
          f"{arguments.threads} torch thread(s), median of {repeats} timed pair(s) of calls after 1 warm-up call "
          "per mode; samples/s is the steady state (long call minus short call).")
    print("samples/s counts steps * batch: exact for non-private, the expected number under the DP modes' "
          "Poisson sampling.\n")
    rows = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Opacus's secure-RNG and backward-hook warnings, once per call
        for student in students:
            rows += benchmark_student(student, repeats)
    print_table(rows)
    peak_rss = peak_rss_mib()
    print(f"\npeak RSS of the whole run: {peak_rss:.0f} MiB")
    if arguments.json:
        report = {"settings": {"threads": arguments.threads, "repeats": repeats, "quick": arguments.quick,
                               "warmup_calls_per_mode": 1, "records_per_split": "batch_size * "
                               f"{BATCHES_PER_EPOCH}", "noise_multiplier": 1.0, "max_grad_norm": 1.0,
                               "samples_counted_as": "steps * batch_size (expected under Poisson sampling)",
                               "torch": torch.__version__, "opacus": opacus.__version__,
                               "python": platform.python_version(), "machine": platform.machine(),
                               "students": {s.name: {"spec": s.spec.to_dict(), "optimizer": s.optimizer,
                                                     "learning_rate": s.learning_rate} for s in students}},
                  "results": rows, "peak_rss_mib": peak_rss}
        arguments.json.parent.mkdir(parents=True, exist_ok=True)
        arguments.json.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {arguments.json}")


if __name__ == "__main__":
    main()
