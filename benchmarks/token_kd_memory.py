"""What the 262,144-token output layer costs in the token-level KD loss: chunked against unchunked.

A student stand-in of the Gemma 3 270M shapes (hidden 640, vocabulary 262,144, frozen output layer, one
trainable hidden -> hidden layer in front of it) trains one step (forward and backward) of
:mod:`distill.token_kd` on a batch of 8 x 64 tokens against a top-32 cache, in three ways:

* ``unchunked``: the logits [batch, seq, vocab] are materialised and the loss runs over all positions at once;
* ``chunked-logits``: the same logits, the loss a chunk of positions at a time under checkpointing;
* ``chunked-hidden``: :func:`distill.token_kd.chunked_token_kd_loss`, the logits never materialised (the
  output layer runs per chunk inside the checkpoint);
* and, for scale, ``head-only``: the output layer's forward and backward with no loss at all.

Memory: each variant in a fresh process, the peak resident set during one step above the resident set before
it (Linux's VmHWM, reset through /proc/self/clear_refs after setup and one warm-up step). Time: all variants
in one process, taking turns for ``--repeats`` rounds (so that other load on the machine hits them alike), the
median step of each. It also times building the cache (top-k and the tail logits at the default temperature
grid) per position. Ratios are against ``unchunked``.

    .venv/bin/python benchmarks/token_kd_memory.py [--chunk 64] [--repeats 5] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from distill.token_kd import (DEFAULT_TEMPERATURES, TopKTargets, build_topk_targets, chunked_token_kd_loss,
                              concatenate_targets, token_kd_loss)

VARIANTS = ("unchunked", "chunked-logits", "chunked-hidden", "head-only")


def kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def shapes(args: argparse.Namespace) -> tuple[nn.Linear, nn.Linear, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The student stand-in and its batch, the same in every process (fixed seeds)."""
    torch.manual_seed(0)
    head = nn.Linear(args.hidden, args.vocab, bias=False).requires_grad_(False)
    nn.init.normal_(head.weight, std=1.0)
    body = nn.Linear(args.hidden, args.hidden)
    # Scaled so that the logits spread by a few units (std about 2 for the student, 4 for the teacher), as a base
    # LM's do; the numbers measured here hardly depend on it.
    inputs = torch.randn(args.batch, args.seq, args.hidden) * 0.15
    input_ids = torch.randint(0, args.vocab, (args.batch, args.seq))
    mask = torch.ones(args.batch, args.seq, dtype=torch.long)
    return head, body, inputs, input_ids, mask


def build_cache(args: argparse.Namespace, path: Path) -> dict[str, float]:
    """Teacher targets from a separate random teacher head, one sequence at a time (as a site would batch)."""
    _, _, inputs, _, mask = shapes(args)
    teacher = nn.Linear(args.hidden, args.vocab, bias=False).requires_grad_(False)
    nn.init.normal_(teacher.weight, std=1.0)
    parts, head_seconds, build_seconds = [], 0.0, 0.0
    with torch.no_grad():
        for row in range(args.batch):
            started = time.perf_counter()
            logits = teacher(inputs[row:row + 1] * 1.2)
            head_seconds += time.perf_counter() - started
            started = time.perf_counter()
            parts.append(build_topk_targets(logits, mask[row:row + 1], args.k))
            build_seconds += time.perf_counter() - started
    np.savez(path, **concatenate_targets(parts).to_arrays())
    positions = args.batch * args.seq
    return {"teacher_head_ms_per_position": 1000 * head_seconds / positions,
            "cache_build_ms_per_position": 1000 * build_seconds / positions,
            "temperatures": len(DEFAULT_TEMPERATURES)}


def step(variant: str, args: argparse.Namespace, head: nn.Linear, body: nn.Linear, inputs: torch.Tensor,
         input_ids: torch.Tensor, mask: torch.Tensor, targets: TopKTargets) -> None:
    body.zero_grad(set_to_none=True)
    hidden = body(inputs)
    if variant == "head-only":
        loss = head(hidden).sum()
    elif variant == "chunked-hidden":
        loss = chunked_token_kd_loss(hidden, head, targets, input_ids, mask, args.temperature, 0.5,
                                     chunk_size=args.chunk).mean()
    else:
        chunk = args.chunk if variant == "chunked-logits" else None
        loss = token_kd_loss(head(hidden), targets, input_ids, mask, args.temperature, 0.5, chunk_size=chunk).mean()
    loss.backward()


def load_targets(cache: Path) -> TopKTargets:
    with np.load(cache) as archive:
        return TopKTargets.from_arrays(archive)


def peak_memory(variant: str, args: argparse.Namespace, cache: Path) -> float:
    """MiB above the resident set that one step of ``variant`` needs at its peak (run in a fresh process)."""
    head, body, inputs, input_ids, mask = shapes(args)
    targets = load_targets(cache)
    step(variant, args, head, body, inputs, input_ids, mask, targets)  # warm-up: allocator, threads
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current resident set
    before = kib("VmRSS")
    step(variant, args, head, body, inputs, input_ids, mask, targets)
    return (kib("VmHWM") - before) / 1024


def step_times(args: argparse.Namespace, cache: Path) -> dict[str, list[float]]:
    """Seconds per step of every variant, the variants taking turns round after round."""
    head, body, inputs, input_ids, mask = shapes(args)
    targets = load_targets(cache)
    seconds: dict[str, list[float]] = {variant: [] for variant in VARIANTS}
    for round_ in range(args.repeats + 1):  # round 0 warms up
        for variant in VARIANTS:
            started = time.perf_counter()
            step(variant, args, head, body, inputs, input_ids, mask, targets)
            if round_:
                seconds[variant].append(time.perf_counter() - started)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, default=262_144)
    parser.add_argument("--hidden", type=int, default=640)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--chunk", type=int, default=64, help="positions per chunk")
    parser.add_argument("--temperature", type=float, default=2.0)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)  # internal: the child process
    parser.add_argument("--cache", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:
        print(json.dumps(peak_memory(args.variant, args, args.cache)))
        return
    with tempfile.TemporaryDirectory() as directory:
        cache = Path(directory) / "targets.npz"
        build = build_cache(args, cache)
        forwarded = [f"--{name}={getattr(args, name)}" for name in
                     ("vocab", "hidden", "batch", "seq", "k", "chunk", "temperature", "repeats")]
        results = {}
        for variant in VARIANTS:
            child = subprocess.run([sys.executable, __file__, *forwarded, f"--variant={variant}", f"--cache={cache}"],
                                   check=True, capture_output=True, text=True)
            results[variant] = {"peak_extra_mib": json.loads(child.stdout.strip().splitlines()[-1])}
        for variant, seconds in step_times(args, cache).items():
            results[variant].update(seconds_per_step=statistics.median(seconds), seconds=seconds)
    base = results["unchunked"]
    logits_mib = args.batch * args.seq * args.vocab * 4 / 2 ** 20
    print(f"vocab {args.vocab:,}, hidden {args.hidden}, batch {args.batch} x seq {args.seq}, top-{args.k}, "
          f"chunk {args.chunk} positions, {torch.get_num_threads()} threads; one logits tensor is {logits_mib:.0f} MiB")
    print(f"{'variant':<16}{'peak extra MiB':>16}{'x unchunked':>13}{'s/step':>9}{'x unchunked':>13}")
    for variant, result in results.items():
        memory, seconds = result["peak_extra_mib"], result["seconds_per_step"]
        print(f"{variant:<16}{memory:>16.0f}{memory / base['peak_extra_mib']:>13.3f}"
              f"{seconds:>9.2f}{seconds / base['seconds_per_step']:>13.3f}")
    print(f"cache build: {build['cache_build_ms_per_position']:.2f} ms per position (top-k and {build['temperatures']} "
          f"tail logits) against {build['teacher_head_ms_per_position']:.2f} ms for the teacher's output layer alone")
    if args.json:
        args.json.write_text(json.dumps({"machine": platform.platform(), "threads": torch.get_num_threads(),
                                         "settings": {k: v for k, v in vars(args).items() if k not in
                                                      ("json", "variant", "cache")},
                                         "results": results, "cache_build": build}, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
