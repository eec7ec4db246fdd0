"""What DP-SGD costs a causal-LM student: tokens/s of the DP step against the non-private step (issue 12, item 5).

The student is the 4-of-18-layer student of the Gemma 3 270M teacher (layers 0, 6, 12, 17, the tied embedding
frozen), distilled against the real teacher's top-k targets on real health-news tweets
(:mod:`simulations.health_tweets`); ``--tiny`` uses a tiny random Gemma 3 config and random tokens instead
(seconds, for a smoke run). Two fragment kinds, the two of issue 12:

* ``lora``: peft LoRA adapters (r 8 on q, v, o) trained, everything else frozen;
* ``blocks``: the decoder blocks and the final norm trained (the student's whole trainable part).

And three modes: ``non-private`` (:func:`distill.causal_train.distill_causal`, shuffled batches of exactly
``--batch`` sequences), ``ghost`` and ``hooks`` (:func:`client.privacy.private_distill_causal` with that
``grad_sample_mode``, Poisson-sampled at ``q = batch / records``). Every call starts from a fresh student built
the same way. The teacher's targets are computed once, before any timing, as a site caches them.

Timing follows benchmarks/dp_overhead.py: per mode, one warm-up call of one step, then pairs of calls of
``--steps`` and ``2 * --steps`` steps drawn with the same seed (each repeat another seed); their difference is
the steady-state cost of the extra steps, and what is left of the short call is the per-call setup (Opacus's
engine, ``make_private``, ``cleanup``; the criterion's check). Modes take turns within each repeat. Tokens are
the real (unpadded) tokens of the sequences the extra steps trained on, counted (Poisson batches vary in size).
Throughput is given per wall second and per CPU second of this process: on a machine shared with other work the
CPU-time ratios are the steadier ones.

    .venv/bin/python benchmarks/llm_distill.py                      # real teacher (minutes)
    .venv/bin/python benchmarks/llm_distill.py --tiny               # tiny config (seconds)
    .venv/bin/python benchmarks/llm_distill.py --json docs/benchmarks/llm_distill.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import opacus
import torch
from torch import nn

from client.privacy import private_distill_causal
from distill.causal_lm import (add_lora, layer_subset_student, parameter_counts, student_from_config,
                               trainable_tensor_names)
from distill.causal_train import CausalTrainSettings, distill_causal, teacher_targets
from distill.data import SplitData
from distill.token_kd import TopKTargets
from protocols.accounting import Calibration

MODES = ("non-private", "ghost", "hooks")
FRAGMENTS = ("lora", "blocks")
STUDENT_LAYERS = (0, 6, 12, 17)  # of Gemma's 18: the student of wave2_facts.md, 0.22x the non-embedding parameters
TINY_LAYERS = (0, 3)
TEMPERATURE = 2.0
SEED = 0


def real_setup(arguments: argparse.Namespace) -> tuple[nn.Module, SplitData, str]:
    """The Gemma 3 270M teacher and ``--records`` tweets tokenised to ``--seq`` tokens."""
    from distill.causal_lm import assemble_default_teacher, load_causal_lm_teacher, tokenize_texts
    from simulations.health_tweets import load_health_tweets

    start = time.perf_counter()
    teacher = load_causal_lm_teacher(assemble_default_teacher(arguments.teacher_dir))
    print(f"teacher loaded in {time.perf_counter() - start:.0f} s ({teacher.source.name})")
    texts = load_health_tweets()["text"].tolist()[:arguments.records]
    data = SplitData(tokenize_texts(teacher.tokenizer, texts, arguments.seq), np.zeros(len(texts), np.int64))
    return teacher.model, data, f"Gemma 3 270M ({teacher.source.name}), {len(texts)} health tweets"


def tiny_setup(arguments: argparse.Namespace) -> tuple[nn.Module, SplitData, str]:
    """A random 4-layer Gemma 3 teacher (vocabulary 256, hidden 64) and random right-padded sequences."""
    from transformers import Gemma3TextConfig

    config = Gemma3TextConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                              num_attention_heads=2, num_key_value_heads=1, head_dim=32, max_position_embeddings=128,
                              sliding_window=16, layer_types=["sliding_attention", "full_attention"] * 2,
                              pad_token_id=0, eos_token_id=1, bos_token_id=2, initializer_range=0.2)
    torch.manual_seed(SEED)
    teacher = student_from_config(config).eval().requires_grad_(False)
    rng = np.random.default_rng(SEED)
    lengths = rng.integers(arguments.seq // 2, arguments.seq + 1, arguments.records)
    mask = (np.arange(arguments.seq)[None, :] < lengths[:, None]).astype(np.int64)
    ids = np.where(mask == 1, rng.integers(3, 256, mask.shape), 0)
    return teacher, SplitData({"input_ids": ids, "attention_mask": mask}, np.zeros(len(ids), np.int64)), \
        "tiny random Gemma 3 (vocabulary 256, hidden 64, 4 layers), random tokens"


def student_factory(teacher: nn.Module, layers: tuple[int, ...], fragments: str) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        student = layer_subset_student(teacher, layers)
        return add_lora(student) if fragments == "lora" else student
    return build


@dataclass(frozen=True)
class CountedTargets(TopKTargets):
    """The cache, recording the sequences each training step selects: Poisson-sampled batches vary in size, so
    the tokens a call trained on are counted rather than assumed."""

    selected: list[np.ndarray] = field(default_factory=list)

    def select(self, sequences: Sequence[int] | np.ndarray) -> TopKTargets:
        self.selected.append(np.asarray(sequences, dtype=np.int64))
        return super().select(sequences)


@dataclass(frozen=True)
class Call:
    wall: float  # seconds
    cpu: float  # this process's CPU seconds, all threads: less sensitive to other load on a shared machine
    tokens: int  # real tokens of the sequences trained on


def train_once(build: Callable[[], nn.Module], mode: str, data: SplitData, cache: TopKTargets, steps: int,
               batch: int, seed: int) -> Call:
    """One training call of ``steps`` steps in ``mode`` on a freshly built student. The same ``seed`` draws the same
    first batches, so a longer call's extra steps are exactly its extra batches."""
    model = build()
    names = trainable_tensor_names(model)
    targets = CountedTargets(**{f.name: getattr(cache, f.name) for f in fields(TopKTargets)})
    settings = CausalTrainSettings(steps=steps, batch_size=batch, learning_rate=0.01, temperature=TEMPERATURE,
                                   alpha=0.5, seed=seed)
    # The noise level does not change the cost; the rate is exactly batch / records (records is a multiple).
    calibration = Calibration(run_id="bench", target_epsilon=8.0, delta=1e-5, noise_multiplier=1.0,
                              sample_rate=batch / len(data), planned_steps=steps, batch_size=batch, max_grad_norm=1.0,
                              records=len(data), accountant="prv")
    wall, cpu = time.perf_counter(), time.process_time()
    if mode == "non-private":
        distill_causal(model, data, targets, settings, names)
    else:
        private_distill_causal(model, data, targets, settings, names, calibration, prior=[], run_id="bench",
                               server_round=1, secret_seed=seed, grad_sample_mode=mode)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    mask = data.inputs["attention_mask"]
    return Call(wall, cpu, sum(int(mask[index].sum()) for index in targets.selected))


def benchmark(teacher: nn.Module, layers: tuple[int, ...], data: SplitData, targets: TopKTargets,
              arguments: argparse.Namespace) -> list[dict[str, Any]]:
    """One row per fragment kind and mode: medians over ``--repeats`` pairs of calls, each repeat with its own
    seed (other batches), the modes taking turns so that a slow spell of a shared machine hits them alike."""
    rows = []
    for fragments in arguments.fragments:
        build = student_factory(teacher, layers, fragments)
        trainable = parameter_counts(build()).trainable
        measured: dict[str, dict[str, list[float]]] = {mode: {"wall": [], "cpu": [], "setup": []}
                                                       for mode in arguments.modes}
        for mode in arguments.modes:  # a warm-up call each: first calls pay for lazy initialisation
            train_once(build, mode, data, targets, 1, arguments.batch, SEED)
        for repeat in range(arguments.repeats):
            for mode in arguments.modes:
                short = train_once(build, mode, data, targets, arguments.steps, arguments.batch, SEED + repeat)
                long = train_once(build, mode, data, targets, 2 * arguments.steps, arguments.batch, SEED + repeat)
                tokens = long.tokens - short.tokens
                measured[mode]["wall"].append(tokens / (long.wall - short.wall))
                measured[mode]["cpu"].append(tokens / (long.cpu - short.cpu))
                measured[mode]["setup"].append(max(0.0, short.wall - (long.wall - short.wall)))
                print(f"  {fragments:<6} {mode:<11} {measured[mode]['wall'][-1]:8.1f} tokens/s, "
                      f"{measured[mode]['cpu'][-1]:8.1f} tokens/CPU-s", flush=True)
        for mode in arguments.modes:
            rows.append({"fragments": fragments, "mode": mode, "trainable_parameters": trainable,
                         "tokens_per_second": statistics.median(measured[mode]["wall"]),
                         "tokens_per_cpu_second": statistics.median(measured[mode]["cpu"]),
                         "tokens_per_second_each_repeat": measured[mode]["wall"],
                         "setup_seconds_per_call": statistics.median(measured[mode]["setup"])})
        baseline = next(r for r in rows if r["fragments"] == fragments and r["mode"] == "non-private")
        for row in rows:
            if row["fragments"] == fragments:
                row["ratio_to_non_private"] = row["tokens_per_second"] / baseline["tokens_per_second"]
                row["cpu_ratio_to_non_private"] = row["tokens_per_cpu_second"] / baseline["tokens_per_cpu_second"]
    return rows


def print_table(rows: list[dict[str, Any]]) -> None:
    header = (f"{'fragments':<9} {'trainable':>11} {'mode':<11} {'tokens/s':>9} {'x non-private':>14} "
              f"{'tokens/CPU-s':>13} {'x non-private':>14} {'setup s/call':>13}")
    print(header)
    print("-" * len(header))
    for row in rows:
        print(f"{row['fragments']:<9} {row['trainable_parameters']:>11,} {row['mode']:<11} "
              f"{row['tokens_per_second']:>9.1f} {row['ratio_to_non_private']:>13.3f}x "
              f"{row['tokens_per_cpu_second']:>13.1f} {row['cpu_ratio_to_non_private']:>13.3f}x "
              f"{row['setup_seconds_per_call']:>13.2f}")


def parse_arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="a tiny random Gemma 3 config instead of the real teacher")
    parser.add_argument("--teacher-dir", type=Path, default=Path("runs") / "teacher",
                        help="where the embedded Gemma GGUF is assembled (once)")
    parser.add_argument("--batch", type=int, default=8, help="sequences per step (expected, under Poisson sampling)")
    parser.add_argument("--batches-per-epoch", type=int, default=4,
                        help="records = batch * this, so the Poisson rate is batch / records exactly")
    parser.add_argument("--seq", type=int, default=32, help="tokens per sequence (the tweets are short)")
    parser.add_argument("--k", type=int, default=32, help="the teacher's top-k")
    parser.add_argument("--steps", type=int,
                        help="steps of the short call, the long one takes twice (default: 2, with --tiny 20)")
    parser.add_argument("--repeats", type=int, default=3, help="timed pairs per mode; the median is reported")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--fragments", nargs="+", choices=FRAGMENTS, default=list(FRAGMENTS))
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(),
                        help="torch intra-op threads (default: all cores, as a site trains)")
    parser.add_argument("--json", type=Path, help="also write the results and settings to this JSON file")
    arguments = parser.parse_args()
    arguments.records = arguments.batch * arguments.batches_per_epoch
    if arguments.steps is None:  # a tiny step takes milliseconds: more of them, or timer noise dominates
        arguments.steps = 20 if arguments.tiny else 2
    if "non-private" not in arguments.modes:
        parser.error("--modes must include non-private: the ratios are against it")
    return arguments


def main() -> None:
    arguments = parse_arguments()
    torch.set_num_threads(arguments.threads)
    teacher, data, described = (tiny_setup if arguments.tiny else real_setup)(arguments)
    layers = TINY_LAYERS if arguments.tiny else STUDENT_LAYERS
    start = time.perf_counter()
    # Only the temperature the benchmark trains at: each grid temperature costs a pass over the vocabulary.
    targets = teacher_targets(teacher, data.inputs["input_ids"], data.inputs["attention_mask"], arguments.k,
                              arguments.batch, temperatures=(TEMPERATURE,))
    cache_seconds = time.perf_counter() - start
    print(f"{described}; student layers {list(layers)}; top-{arguments.k} targets for {targets.token_ids.shape[0]} "
          f"real tokens in {cache_seconds:.1f} s")
    print(f"torch {torch.__version__}, opacus {opacus.__version__}, {arguments.threads} thread(s); batch "
          f"{arguments.batch} x {arguments.seq} tokens, {arguments.records} records; steady state of "
          f"{arguments.steps} steps (a {2 * arguments.steps}-step call minus a {arguments.steps}-step call), median "
          f"of {arguments.repeats}\n")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Opacus's secure-RNG and backward-hook warnings, once per call
        rows = benchmark(teacher, layers, data, targets, arguments)
    print()
    print_table(rows)
    if arguments.json:
        report = {"settings": {"tiny": arguments.tiny, "teacher": described, "student_layers": list(layers),
                               "batch": arguments.batch, "sequence_length": arguments.seq,
                               "records": arguments.records, "k": arguments.k, "temperature": TEMPERATURE,
                               "steps": arguments.steps, "repeats": arguments.repeats,
                               "threads": arguments.threads, "noise_multiplier": 1.0, "max_grad_norm": 1.0,
                               "real_tokens": int(data.inputs["attention_mask"].sum()),
                               "cache_seconds": cache_seconds, "torch": torch.__version__,
                               "opacus": opacus.__version__, "python": platform.python_version(),
                               "machine": platform.machine()},
                  "results": rows}
        arguments.json.parent.mkdir(parents=True, exist_ok=True)
        arguments.json.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {arguments.json}")


if __name__ == "__main__":
    main()
