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

Two more parts, each selectable alone with ``--part`` (a comma-separated list; the default ``dp`` is the part
above), measure what a round sends and what a student buys at inference, on the students of the Gemma teacher
(layers 0, 6, 12, 17 and 0, 8, 17; the teacher's whole vocabulary and the 16,384-token public subset of
:mod:`distill.vocabulary`, as the health-tweets presets build it):

* ``traffic``: bytes per round per site of each fragment mode. ``lora`` and ``blocks`` are
  :func:`distill.causal_lm.trainable_state` (what a causal-LM site sends); ``full`` is every tensor of the student's
  ``state_dict`` (:func:`distill.models.state_to_numpy`, what a classifier's full-state exchange sends: a tied
  embedding then travels twice, once as the embedding and once as the output layer), and ``full-unique`` the same
  with the tied tensor once. The plain payload is the float32 tensors as sent without SecAgg+ (what the ledger's
  ``update-sent`` records); the SecAgg+ input is :func:`protocols.secagg.encode_update`'s float64 vectors plus its
  two scalars (computed by encode_update itself for ``lora`` and ``blocks``, as 8 bytes per value + 16 for the full
  state, whose float64 copy would take 2.9 GB). Arithmetic on real tensors: nothing is trained.
* ``latency``: CPU milliseconds per generated token of the teacher and of each student (greedy, KV cache, batch 1,
  16 new tokens from the 8-token openings of 4 held-out tweets, as
  :func:`simulations.causal_runner.latency_ms_per_token` generates; one warm-up, then the median of
  ``--latency-repeats`` repeats, the models taking turns), and of one forward pass over a 32-token real sequence
  (prefill, the median of 5 calls per repeat; with the logits of every position, as scoring computes them, and of
  the last only, as ``generate`` does); parameter counts, float32 safetensors file sizes (saved to a temporary
  folder) against the teacher's float32 size and its shipped GGUF file. On a shared machine ``--threads 1`` is
  the steadier measurement.

    .venv/bin/python benchmarks/llm_distill.py                      # real teacher (minutes)
    .venv/bin/python benchmarks/llm_distill.py --tiny               # tiny config (seconds)
    .venv/bin/python benchmarks/llm_distill.py --json docs/benchmarks/llm_distill.json
    .venv/bin/python benchmarks/llm_distill.py --part traffic --json docs/benchmarks/llm_distill_traffic.json
    .venv/bin/python benchmarks/llm_distill.py --part latency --json docs/benchmarks/llm_distill_latency.json
    .venv/bin/python benchmarks/llm_distill.py --part latency --threads 1 \\
        --json docs/benchmarks/llm_distill_latency_1thread.json
    .venv/bin/python benchmarks/llm_distill.py --tiny --part traffic,latency   # both, tiny config (seconds)
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import opacus
import torch
from torch import nn

from client.privacy import private_distill_causal
from distill.causal_lm import (add_lora, layer_subset_student, parameter_counts, save_causal_lm_student,
                               student_from_config, trainable_state, trainable_tensor_names)
from distill.causal_train import CausalTrainSettings, distill_causal, teacher_targets
from distill.data import SplitData
from distill.token_kd import TopKTargets
from protocols.accounting import Calibration

PARTS = ("dp", "traffic", "latency")
MODES = ("non-private", "ghost", "hooks")
FRAGMENTS = ("lora", "blocks")
STUDENT_LAYERS = (0, 6, 12, 17)  # of Gemma's 18: the student of wave2_facts.md, 0.22x the non-embedding parameters
TINY_LAYERS = (0, 3)
# The traffic and latency parts: the 4-of-18 student above and the health-tweets presets' 3-of-18 one.
COMPARED_LAYERS = ((0, 6, 12, 17), (0, 8, 17))
TINY_COMPARED_LAYERS = ((0, 2, 3), (0, 3))
TINY_VOCABULARY = 64  # of the tiny config's 256
PAYLOAD_MODES = ("lora", "blocks", "full", "full-unique")
PREFILL_TOKENS = 32
PREFILL_CALLS = 5  # forward passes per repeat, their median kept: one takes milliseconds
TEMPERATURE = 2.0
SEED = 0


def load_teacher(arguments: argparse.Namespace) -> Any:
    """The embedded Gemma 3 270M teacher (a :class:`distill.causal_lm.CausalLMTeacher`), assembled once."""
    from distill.causal_lm import assemble_default_teacher, load_causal_lm_teacher

    start = time.perf_counter()
    teacher = load_causal_lm_teacher(assemble_default_teacher(arguments.teacher_dir))
    print(f"teacher loaded in {time.perf_counter() - start:.0f} s ({teacher.source.name})")
    return teacher


def real_setup(teacher: Any, arguments: argparse.Namespace) -> tuple[nn.Module, SplitData, str]:
    """The Gemma 3 270M teacher and ``--records`` tweets tokenised to ``--seq`` tokens."""
    from distill.causal_lm import tokenize_texts
    from simulations.health_tweets import load_health_tweets

    texts = load_health_tweets()["text"].tolist()[:arguments.records]
    data = SplitData(tokenize_texts(teacher.tokenizer, texts, arguments.seq), np.zeros(len(texts), np.int64))
    return teacher.model, data, f"Gemma 3 270M ({teacher.source.name}), {len(texts)} health tweets"


def tiny_teacher() -> nn.Module:
    """A random 4-layer Gemma 3 teacher (vocabulary 256, hidden 64)."""
    from transformers import Gemma3TextConfig

    config = Gemma3TextConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                              num_attention_heads=2, num_key_value_heads=1, head_dim=32, max_position_embeddings=128,
                              sliding_window=16, layer_types=["sliding_attention", "full_attention"] * 2,
                              pad_token_id=0, eos_token_id=1, bos_token_id=2, initializer_range=0.2)
    torch.manual_seed(SEED)
    return student_from_config(config).eval().requires_grad_(False)


def tiny_setup(arguments: argparse.Namespace) -> tuple[nn.Module, SplitData, str]:
    """A random 4-layer Gemma 3 teacher (vocabulary 256, hidden 64) and random right-padded sequences."""
    teacher = tiny_teacher()
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


# --------------------------------------------------------------------------------------------- traffic, latency
@dataclass
class Comparison:
    """What the traffic and latency parts need besides the teacher: the public corpus, the held-out openings."""

    teacher: nn.Module
    described: str
    special_ids: list[int]  # pad, bos, eos, unk: always in the student's vocabulary
    public: dict[str, np.ndarray]  # the public corpus, tokenised (input_ids, attention_mask)
    prompts: np.ndarray  # [prompts, LATENCY_PROMPT_TOKENS] teacher ids, no padding
    prefill: np.ndarray  # [1, PREFILL_TOKENS] teacher ids, no padding
    pad_token_id: int
    teacher_file: Path | None  # the shipped GGUF file
    layer_sets: tuple[tuple[int, ...], ...]
    vocabulary: int  # the subset's size V' (the student's vocabulary is V' + 1, with <oov>)
    new_tokens: int


def real_comparison(teacher: Any) -> Comparison:
    """The tiny health-tweets preset's public corpus and held-out tweets, read by the teacher's tokenizer."""
    from distill.causal_lm import tokenize_texts
    from simulations.causal_runner import LATENCY_NEW_TOKENS, LATENCY_PROMPT_TOKENS, LATENCY_PROMPTS
    from simulations.health_tweets import PRESETS, health_tweet_sites

    preset = PRESETS["tiny"]
    sites, public = health_tweet_sites(preset.sites, preset.max_per_site)
    tokenizer = teacher.tokenizer
    special = [i for i in (tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id,
                           tokenizer.unk_token_id) if i is not None]
    public_tokens = tokenize_texts(tokenizer, public, preset.max_length)
    held_out = next(iter(sites.values())).test  # the largest agency's test split, as causal_runner takes it
    encoded = tokenize_texts(tokenizer, held_out, preset.max_length)
    # Openings without padding: a tweet shorter than the opening would feed pad tokens to generate.
    long_enough = np.flatnonzero(encoded["attention_mask"].sum(axis=1) >= LATENCY_PROMPT_TOKENS)[:LATENCY_PROMPTS]
    prompts = encoded["input_ids"][long_enough, :LATENCY_PROMPT_TOKENS]
    prefill = tokenize_texts(tokenizer, [" ".join(held_out)], PREFILL_TOKENS)
    if len(prompts) < LATENCY_PROMPTS or prefill["attention_mask"].sum() != PREFILL_TOKENS:
        raise SystemExit("too few held-out tokens for the latency prompts")
    return Comparison(teacher.model, f"Gemma 3 270M ({teacher.source.name})", special, public_tokens, prompts,
                      prefill["input_ids"], int(tokenizer.pad_token_id), Path(teacher.source), COMPARED_LAYERS,
                      preset.vocabulary, LATENCY_NEW_TOKENS)


def tiny_comparison() -> Comparison:
    """The tiny random Gemma 3 config with random 'public' tokens and openings (seconds, to try the code)."""
    rng = np.random.default_rng(SEED)
    public = rng.integers(3, 256, (200, 16))
    return Comparison(tiny_teacher(), "tiny random Gemma 3 (vocabulary 256, hidden 64, 4 layers), random tokens",
                      [0, 1, 2], {"input_ids": public, "attention_mask": np.ones_like(public)},
                      rng.integers(3, 256, (4, 8)), rng.integers(3, 256, (1, PREFILL_TOKENS)), 0, None,
                      TINY_COMPARED_LAYERS, TINY_VOCABULARY, 16)


def public_subset(comparison: Comparison) -> Any:
    from distill.vocabulary import public_vocabulary

    return public_vocabulary(comparison.public["input_ids"], comparison.public["attention_mask"],
                             comparison.teacher.get_input_embeddings().num_embeddings, comparison.vocabulary,
                             comparison.special_ids)


def compared_student(comparison: Comparison, layers: tuple[int, ...], subset: Any | None) -> nn.Module:
    """A layer-subset student of the teacher, with the public vocabulary subset when one is given."""
    from distill.vocabulary import restrict_vocabulary

    student = layer_subset_student(comparison.teacher, layers)
    return student if subset is None else restrict_vocabulary(student, subset)


def payload_row(mode: str, tensors: Mapping[str, tuple[int, int]], secagg_bytes: int | None) -> dict[str, Any]:
    """``tensors``: name -> (values, bytes per value) as sent plain. The SecAgg+ input is float64 vectors, one per
    tensor, plus the weight and the scaled loss (protocols.secagg.encode_update); ``secagg_bytes`` is what
    encode_update itself produced, checked against that arithmetic."""
    values = sum(count for count, _ in tensors.values())
    secagg = 8 * values + 16
    if secagg_bytes is not None and secagg_bytes != secagg:
        raise AssertionError(f"{mode}: encode_update gave {secagg_bytes} bytes, expected {secagg}")
    return {"mode": mode, "tensors": len(tensors), "parameters": values,
            "plain_bytes": sum(count * size for count, size in tensors.values()), "secagg_input_bytes": secagg,
            "secagg_counted_by": "encode_update" if secagg_bytes is not None else "8 bytes per value + 16"}


def secagg_input_bytes(state: Mapping[str, np.ndarray]) -> int:
    """The bytes of encode_update's vectors for ``state`` (the change itself does not matter, only its size)."""
    from protocols.config import FederationConfig
    from protocols.secagg import encode_update

    weight_scale = FederationConfig.weight_scale  # the run config's defaults
    encoded = encode_update(state, state, list(state), weight_scale, 0.0, FederationConfig.clipping_range,
                            weight_scale)
    return int(sum(np.asarray(vector).nbytes for vector in encoded.vectors))


def traffic(comparison: Comparison) -> list[dict[str, Any]]:
    """Bytes per round per site of each payload mode, per student; ratios against the full state."""
    subset = public_subset(comparison)
    rows = []
    for layers in comparison.layer_sets:
        for vocabulary in (None, subset):
            student = compared_student(comparison, layers, vocabulary)
            shape = {"layers": list(layers), "vocabulary": student.get_input_embeddings().num_embeddings}
            group: dict[str, dict[str, Any]] = {}
            # What a classifier's full-state exchange sends (distill.models.state_to_numpy): the state_dict, in which
            # a tied embedding appears twice (model.embed_tokens.weight and lm_head.weight).
            state = student.state_dict()
            group["full"] = payload_row("full", {n: (t.numel(), t.element_size()) for n, t in state.items()}, None)
            unique: dict[str, tuple[int, int]] = {}
            seen: set[int] = set()
            for name, tensor in state.items():
                if tensor.data_ptr() not in seen:
                    seen.add(tensor.data_ptr())
                    unique[name] = (tensor.numel(), tensor.element_size())
            group["full-unique"] = payload_row("full-unique", unique, None)
            del state
            blocks = trainable_state(student)
            group["blocks"] = payload_row("blocks", {n: (v.size, v.itemsize) for n, v in blocks.items()},
                                          secagg_input_bytes(blocks))
            del blocks
            student = add_lora(student)
            adapters = trainable_state(student)
            group["lora"] = payload_row("lora", {n: (v.size, v.itemsize) for n, v in adapters.items()},
                                        secagg_input_bytes(adapters))
            for mode in PAYLOAD_MODES:
                row = {**shape, **group[mode]}
                row["plain_ratio_to_full"] = row["plain_bytes"] / group["full"]["plain_bytes"]
                row["secagg_ratio_to_full"] = row["secagg_input_bytes"] / group["full"]["secagg_input_bytes"]
                row["secagg_ratio_to_plain"] = row["secagg_input_bytes"] / row["plain_bytes"]
                rows.append(row)
            del student, adapters
            gc.collect()
    return rows


def print_traffic(rows: list[dict[str, Any]]) -> None:
    header = (f"{'layers':<14} {'vocab':>7} {'mode':<11} {'tensors':>7} {'parameters':>12} {'plain bytes':>14} "
              f"{'SecAgg+ bytes':>14} {'plain x full':>12} {'SecAgg+ x full':>14}")
    print(header)
    print("-" * len(header))
    for row in rows:
        print(f"{','.join(map(str, row['layers'])):<14} {row['vocabulary']:>7} {row['mode']:<11} {row['tensors']:>7} "
              f"{row['parameters']:>12,} {row['plain_bytes']:>14,} {row['secagg_input_bytes']:>14,} "
              f"{row['plain_ratio_to_full']:>12.5f} {row['secagg_ratio_to_full']:>14.5f}")


def generation_seconds(model: nn.Module, prompts: np.ndarray, pad_token_id: int,
                       new_tokens: int) -> tuple[float, float]:
    """Wall and CPU seconds of greedy generation (KV cache, batch 1) of exactly ``new_tokens`` per prompt."""
    wall, cpu = time.perf_counter(), time.process_time()
    for prompt in prompts:
        ids = torch.from_numpy(np.asarray(prompt, dtype=np.int64)).unsqueeze(0)
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, do_sample=False, pad_token_id=pad_token_id)
        if out.shape[1] != ids.shape[1] + new_tokens:
            raise AssertionError(f"generated {out.shape[1] - ids.shape[1]} tokens, expected {new_tokens}")
    return time.perf_counter() - wall, time.process_time() - cpu


@torch.no_grad()
def prefill_seconds(model: nn.Module, ids: np.ndarray, last_only: bool) -> float:
    """The median wall seconds of PREFILL_CALLS forward passes over ``ids`` (no cache): the logits of every
    position (as scoring and distillation compute them) or of the last only (as generate's prefill does)."""
    tensor = torch.from_numpy(np.asarray(ids, dtype=np.int64))
    times = []
    for _ in range(PREFILL_CALLS):
        start = time.perf_counter()
        model(input_ids=tensor, attention_mask=torch.ones_like(tensor), use_cache=False,
              logits_to_keep=1 if last_only else 0)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def file_bytes(model: nn.Module) -> dict[str, int]:
    """The float32 safetensors file(s) of ``save_pretrained`` (a tied embedding written once), and the folder."""
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    with tempfile.TemporaryDirectory(prefix="fedistill-bench-") as scratch:
        folder = save_causal_lm_student(model, Path(scratch) / "student")
        files = [f for f in folder.rglob("*") if f.is_file()]
        return {"safetensors_bytes": sum(f.stat().st_size for f in files if f.suffix == ".safetensors"),
                "folder_bytes": sum(f.stat().st_size for f in files)}


def latency(comparison: Comparison, repeats: int) -> list[dict[str, Any]]:
    """Per model: ms per generated token and per prefill token, parameter counts, file sizes; ratios to the
    teacher. Every model is warmed up first, then the models take turns within each repeat."""
    from distill.vocabulary import vocabulary_of

    subset = public_subset(comparison)
    teacher = comparison.teacher.eval()
    models: list[tuple[dict[str, Any], nn.Module]] = []
    teacher_row: dict[str, Any] = {"model": "teacher", "layers": list(range(teacher.config.num_hidden_layers))}
    models.append((teacher_row, teacher))
    for layers in comparison.layer_sets:
        for vocabulary in (None, subset):
            student = compared_student(comparison, layers, vocabulary).eval()
            models.append(({"model": f"student {len(layers)} layers, "
                                     f"{'full vocabulary' if vocabulary is None else 'subset'}",
                            "layers": list(layers)}, student))
    for row, model in models:
        config = model.config
        row["vocabulary"] = model.get_input_embeddings().num_embeddings
        row["hidden_size"] = config.hidden_size
        row["parameters"] = parameter_counts(model).to_dict()
        # Multiply-adds per token of the matrix products: about one per non-embedding weight in the layers, and
        # vocabulary x hidden in the output layer (the embedding lookup is no product; attention over a short
        # context is small).
        row["multiply_adds_per_token"] = {"layers": row["parameters"]["non_embedding"],
                                          "output_layer": row["vocabulary"] * row["hidden_size"]}
        vocabulary = vocabulary_of(model)
        row["_prompts"] = comparison.prompts if vocabulary is None else vocabulary.student_ids(comparison.prompts)
        row["_prefill"] = comparison.prefill if vocabulary is None else vocabulary.student_ids(comparison.prefill)
        row["_pad"] = comparison.pad_token_id if vocabulary is None else \
            int(vocabulary.student_ids(np.asarray([comparison.pad_token_id]))[0])
        if model is not teacher:
            row.update(file_bytes(model))
        print(f"  {row['model']}: {row['parameters']['total']:,} parameters", flush=True)
    teacher_row["float32_bytes"] = 4 * teacher_row["parameters"]["total"]
    if comparison.teacher_file is not None:
        teacher_row["gguf_bytes"] = comparison.teacher_file.stat().st_size
        teacher_row["gguf_file"] = comparison.teacher_file.name
    tokens = len(comparison.prompts) * comparison.new_tokens
    measured = {id(model): {"generate": [], "generate_cpu": [], "prefill_all": [], "prefill_last": []}
                for _, model in models}
    for row, model in models:  # warm-up: first calls allocate and pick kernels
        generation_seconds(model, row["_prompts"][:1], row["_pad"], comparison.new_tokens)
        prefill_seconds(model, row["_prefill"], False)
        prefill_seconds(model, row["_prefill"], True)
    for repeat in range(repeats):
        for row, model in models:
            wall, cpu = generation_seconds(model, row["_prompts"], row["_pad"], comparison.new_tokens)
            times = measured[id(model)]
            times["generate"].append(1000.0 * wall / tokens)
            times["generate_cpu"].append(1000.0 * cpu / tokens)
            times["prefill_all"].append(1000.0 * prefill_seconds(model, row["_prefill"], False) / PREFILL_TOKENS)
            times["prefill_last"].append(1000.0 * prefill_seconds(model, row["_prefill"], True) / PREFILL_TOKENS)
            print(f"  repeat {repeat + 1}: {row['model']:<34} {times['generate'][-1]:7.2f} ms/token generated, "
                  f"{times['prefill_all'][-1]:6.2f} ms/token prefill", flush=True)
    rows = []
    for row, model in models:
        times = measured[id(model)]
        row = {key: value for key, value in row.items() if not key.startswith("_")}
        row["ms_per_generated_token"] = statistics.median(times["generate"])
        row["cpu_ms_per_generated_token"] = statistics.median(times["generate_cpu"])
        row["ms_per_prefill_token_all_logits"] = statistics.median(times["prefill_all"])
        row["ms_per_prefill_token_last_logits"] = statistics.median(times["prefill_last"])
        row["each_repeat"] = times
        rows.append(row)
    teacher_row = rows[0]
    teacher_macs = sum(teacher_row["multiply_adds_per_token"].values())
    for row in rows:
        row["speedup_generate"] = teacher_row["ms_per_generated_token"] / row["ms_per_generated_token"]
        row["speedup_generate_cpu"] = teacher_row["cpu_ms_per_generated_token"] / row["cpu_ms_per_generated_token"]
        row["speedup_prefill_all_logits"] = (teacher_row["ms_per_prefill_token_all_logits"]
                                             / row["ms_per_prefill_token_all_logits"])
        row["speedup_prefill_last_logits"] = (teacher_row["ms_per_prefill_token_last_logits"]
                                              / row["ms_per_prefill_token_last_logits"])
        row["speedup_multiply_adds"] = teacher_macs / sum(row["multiply_adds_per_token"].values())
        for kind in ("total", "embedding", "non_embedding"):
            row[f"{kind}_parameter_ratio_to_teacher"] = row["parameters"][kind] / teacher_row["parameters"][kind]
        if "safetensors_bytes" in row:
            row["file_ratio_to_teacher_float32"] = row["safetensors_bytes"] / teacher_row["float32_bytes"]
            if "gguf_bytes" in teacher_row:
                row["file_ratio_to_teacher_gguf"] = row["safetensors_bytes"] / teacher_row["gguf_bytes"]
    del models
    gc.collect()
    return rows


def print_latency(rows: list[dict[str, Any]]) -> None:
    header = (f"{'model':<34} {'vocab':>7} {'ms/token':>9} {'speedup':>8} {'MAC bound':>9} {'prefill ms/tok':>14} "
              f"{'speedup':>8} {'(last only)':>11} {'non-emb params':>14} {'x teacher':>9} {'file MB':>9}")
    print(header)
    print("-" * len(header))
    for row in rows:
        size = row.get("safetensors_bytes", row.get("float32_bytes"))
        print(f"{row['model']:<34} {row['vocabulary']:>7} {row['ms_per_generated_token']:>9.2f} "
              f"{row['speedup_generate']:>7.2f}x {row['speedup_multiply_adds']:>8.2f}x "
              f"{row['ms_per_prefill_token_all_logits']:>14.2f} {row['speedup_prefill_all_logits']:>7.2f}x "
              f"{row['speedup_prefill_last_logits']:>10.2f}x {row['parameters']['non_embedding']:>14,} "
              f"{row['non_embedding_parameter_ratio_to_teacher']:>9.3f} {size / 1e6:>9.1f}")
    teacher = rows[0]
    if "gguf_bytes" in teacher:
        print(f"teacher: float32 {teacher['float32_bytes'] / 1e6:.1f} MB (parameters x 4), shipped GGUF "
              f"{teacher['gguf_bytes'] / 1e6:.1f} MB ({teacher['gguf_file']}, quantized)")


def parse_arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--part", default="dp",
                        help=f"comma-separated parts to run, of {', '.join(PARTS)} (default: dp, the DP step)")
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
    parser.add_argument("--latency-repeats", type=int, default=3,
                        help="latency part: timed repeats per model (after a warm-up); the median is reported")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(),
                        help="torch intra-op threads (default: all cores, as a site trains)")
    parser.add_argument("--json", type=Path, help="also write the results and settings to this JSON file")
    arguments = parser.parse_args()
    arguments.parts = [part.strip() for part in arguments.part.split(",") if part.strip()]
    unknown = sorted(set(arguments.parts) - set(PARTS))
    if unknown or not arguments.parts:
        parser.error(f"--part: choose among {', '.join(PARTS)}, got {arguments.part!r}")
    arguments.records = arguments.batch * arguments.batches_per_epoch
    if arguments.steps is None:  # a tiny step takes milliseconds: more of them, or timer noise dominates
        arguments.steps = 20 if arguments.tiny else 2
    if "non-private" not in arguments.modes:
        parser.error("--modes must include non-private: the ratios are against it")
    return arguments


def dp_part(teacher: Any, arguments: argparse.Namespace) -> dict[str, Any]:
    """The DP step against the non-private step; its settings and rows."""
    teacher, data, described = tiny_setup(arguments) if arguments.tiny else real_setup(teacher, arguments)
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
    settings = {"tiny": arguments.tiny, "teacher": described, "student_layers": list(layers),
                "batch": arguments.batch, "sequence_length": arguments.seq,
                "records": arguments.records, "k": arguments.k, "temperature": TEMPERATURE,
                "steps": arguments.steps, "repeats": arguments.repeats,
                "threads": arguments.threads, "noise_multiplier": 1.0, "max_grad_norm": 1.0,
                "real_tokens": int(data.inputs["attention_mask"].sum()),
                "cache_seconds": cache_seconds, "torch": torch.__version__,
                "opacus": opacus.__version__, "python": platform.python_version(),
                "machine": platform.machine()}
    return {"settings": settings, "results": rows}


def comparison_settings(comparison: Comparison, arguments: argparse.Namespace) -> dict[str, Any]:
    import transformers

    return {"tiny": arguments.tiny, "teacher": comparison.described,
            "student_layers": [list(layers) for layers in comparison.layer_sets],
            "vocabulary_subset": comparison.vocabulary, "vocabulary_subset_with_oov": comparison.vocabulary + 1,
            "public_texts": int(len(comparison.public["input_ids"])), "threads": arguments.threads,
            "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version(), "machine": platform.machine()}


def main() -> None:
    arguments = parse_arguments()
    torch.set_num_threads(arguments.threads)
    teacher = None if arguments.tiny else load_teacher(arguments)
    report: dict[str, Any] = {}
    if "dp" in arguments.parts:
        report.update(dp_part(teacher, arguments))
    if {"traffic", "latency"} & set(arguments.parts):
        comparison = tiny_comparison() if arguments.tiny else real_comparison(teacher)
        report.setdefault("settings", {}).update({"comparison": comparison_settings(comparison, arguments)})
        if "traffic" in arguments.parts:
            print(f"\nbytes per round per site, {comparison.described}; vocabulary subset of {comparison.vocabulary} "
                  f"public tokens + <oov>")
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # transformers' deprecation notes as peft wraps the student
                rows = traffic(comparison)
            print_traffic(rows)
            report["traffic"] = rows
        if "latency" in arguments.parts:
            print(f"\nlatency, {comparison.described}; {arguments.threads} thread(s); {len(comparison.prompts)} "
                  f"openings of {comparison.prompts.shape[1]} tokens, {comparison.new_tokens} new tokens each; "
                  f"prefill over {PREFILL_TOKENS} tokens; median of {arguments.latency_repeats}")
            report["settings"]["comparison"].update({
                "prompts": int(len(comparison.prompts)), "prompt_tokens": int(comparison.prompts.shape[1]),
                "new_tokens": comparison.new_tokens, "prefill_tokens": PREFILL_TOKENS,
                "prefill_calls_per_repeat": PREFILL_CALLS, "repeats": arguments.latency_repeats})
            load_before = os.getloadavg()  # a shared machine: how busy it was, for the record
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # generate's notes on generation flags
                rows = latency(comparison, arguments.latency_repeats)
            report["settings"]["comparison"]["load_average_1_5_15_min"] = {"before": list(load_before),
                                                                           "after": list(os.getloadavg())}
            print()
            print_latency(rows)
            report["latency"] = rows
    if arguments.json:
        arguments.json.parent.mkdir(parents=True, exist_ok=True)
        arguments.json.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {arguments.json}")


if __name__ == "__main__":
    main()
