"""What a student vocabulary subset costs in quality and buys in compute (docs/causal_lm.md, "The vocabulary subset").

For subsets of the V' most frequent teacher tokens of the public corpus (health-tweets: the agencies that are not
sites), on the sites' held-out tweets:

* coverage: the share of predicted held-out tokens inside the subset;
* the quality floor: the teacher's own perplexity when its distribution is mapped onto the subset (each kept token
  keeps its probability, <oov> takes the rest) and a token outside the subset costs -log p(<oov>) + log(dropped),
  exactly the rule the student is scored by: no student on that subset can do better than its teacher there;
* the output layer's multiply-adds per token against the teacher's whole forward pass.

    .venv/bin/python benchmarks/vocabulary_cost.py --json docs/benchmarks/vocabulary_cost.json   # about 3 minutes
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
from pathlib import Path

import numpy as np
import torch

from distill.causal_lm import assemble_default_teacher, load_causal_lm_teacher, tokenize_texts
from distill.causal_train import causal_logits, score_tokens
from distill.vocabulary import public_vocabulary
from simulations.health_tweets import health_tweet_sites

SIZES = (8192, 16384, 32768, 65536)


@torch.no_grad()
def teacher_nll_on_subset(model, subset, ids: np.ndarray, mask: np.ndarray, batch: int = 8) -> float:
    nll = []
    for start in range(0, len(ids), batch):
        rows_ids, rows_mask = torch.from_numpy(ids[start:start + batch]), torch.from_numpy(mask[start:start + batch])
        log_probs = subset.teacher_logits_on_subset(causal_logits(model, rows_ids, rows_mask)).double().log_softmax(-1)
        student_ids = subset.student_ids(rows_ids)
        row, column = rows_mask[:, 1:].bool().nonzero(as_tuple=True)
        target = student_ids[row, column + 1]
        token_nll = -log_probs[row, column].gather(-1, target[:, None])[:, 0]
        nll.append(token_nll + (target == subset.oov_id).double() * subset.oov_log_spread)
    return float(torch.cat(nll).mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sites", type=int, default=3)
    parser.add_argument("--per-site", type=int, default=400, help="newest tweets per site (their test split is used)")
    parser.add_argument("--max-length", type=int, default=32)
    parser.add_argument("--teacher-dir", type=Path, default=Path(tempfile.gettempdir()) / "fedistill-teacher")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(2)

    teacher = load_causal_lm_teacher(assemble_default_teacher(args.teacher_dir))
    tokenizer, model = teacher.tokenizer, teacher.model
    sites, public = health_tweet_sites(args.sites, args.per_site)
    test = tokenize_texts(tokenizer, [t for s in sites.values() for t in s.test], args.max_length)
    public_tokens = tokenize_texts(tokenizer, list(public), args.max_length)
    vocab = model.get_input_embeddings().num_embeddings
    special = [i for i in (tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id,
                           tokenizer.unk_token_id) if i is not None]
    predicted = test["input_ids"][:, 1:][test["attention_mask"][:, 1:] == 1]
    full_nll = float(score_tokens(model, test["input_ids"], test["attention_mask"], 8).nll.mean())
    hidden, layers_macs = model.config.hidden_size, 100_326_016  # the teacher's non-embedding parameters
    teacher_macs = layers_macs + vocab * hidden
    rows = [{"vocabulary": vocab, "coverage": 1.0, "teacher_perplexity": math.exp(full_nll), "x_full": 1.0,
             "output_macs_per_token": vocab * hidden, "student_3_layer_macs_x_teacher": None}]
    for size in SIZES:
        subset = public_vocabulary(public_tokens["input_ids"], public_tokens["attention_mask"], vocab, size, special)
        nll = teacher_nll_on_subset(model, subset, test["input_ids"], test["attention_mask"])
        rows.append({"vocabulary": subset.size,
                     "coverage": float(np.mean(subset.student_ids(predicted) != subset.oov_id)),
                     "teacher_perplexity": math.exp(nll), "x_full": math.exp(nll - full_nll),
                     "output_macs_per_token": subset.size * hidden,
                     # the 3-of-18-layer student: 16,822,912 non-embedding parameters plus its output layer
                     "student_3_layer_macs_x_teacher": teacher_macs / (16_822_912 + subset.size * hidden)})
    print(f"{predicted.size} held-out tokens of {len(test['input_ids'])} tweets; public corpus of {len(public)} tweets")
    print(f"{'vocabulary':>10} {'coverage':>9} {'teacher ppl':>12} {'x full':>7} {'3-layer student: teacher MACs x':>32}")
    for row in rows:
        ratio = row["student_3_layer_macs_x_teacher"]
        print(f"{row['vocabulary']:>10,} {row['coverage']:>9.4f} {row['teacher_perplexity']:>12.2f} "
              f"{row['x_full']:>7.3f} {'' if ratio is None else f'{ratio:.2f}':>32}")
    if args.json:
        args.json.write_text(json.dumps({"schema_version": 1, "held_out_tokens": int(predicted.size),
                                         "public_tweets": len(public), "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
