"""Small real-shaped fixtures shared by the tests: tiny students and a tiny tabular site."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from sklearn.linear_model import LogisticRegression

from client.site import Site, create_site
from client.teacher import TeacherDeclaration
from distill.data import SplitData
from distill.models import save_sklearn_teacher
from protocols.config import FederationConfig, StudentSpec

MLP = StudentSpec("mlp", {"input_dim": 5, "hidden": [8, 8], "num_classes": 2})
# The tests' teachers are fitted on data of their own (another seed) or not fitted at all, never on a site's records.
PUBLIC_TEACHER = TeacherDeclaration("public", description="test teacher fitted on separate synthetic data")
TINY_BERT = StudentSpec("bert", {"vocab_size": 100, "hidden_size": 16, "num_hidden_layers": 2,
                                 "num_attention_heads": 2, "intermediate_size": 32, "max_position_embeddings": 16,
                                 "num_labels": 2})


def tabular_split(n: int, seed: int) -> SplitData:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 5)).astype(np.float32)
    y = (x[:, 0] + 0.5 * rng.normal(size=n) > 0).astype(np.int64)
    return SplitData({"x": x}, y, np.arange(n))


def make_site(directory: Path, name: str = "site-a", seed: int = 0) -> Site:
    teacher = LogisticRegression().fit(*(lambda s: (s.inputs["x"], s.labels))(tabular_split(200, 99)))
    save_sklearn_teacher(teacher, directory / "teacher.pkl")
    splits = {"train": tabular_split(64, seed), "val": tabular_split(32, seed + 1), "test": tabular_split(32, seed + 2)}
    return create_site(directory / name, name, splits, directory / "teacher.pkl", teacher_declaration=PUBLIC_TEACHER)


def federation(**overrides) -> FederationConfig:
    return FederationConfig.from_dict({"student": MLP, "rounds": 2, "local_steps": 3, "batch_size": 16,
                                       "learning_rate": 0.05, **overrides})


def text_site(directory: Path, records: int = 24) -> Site:
    """A tiny text site for TINY_BERT whose teacher outputs are already cached (as after round 1)."""
    import torch
    from torch import nn
    from transformers import BertConfig, BertModel

    from distill.cache import TeacherLogitCache
    from distill.models import PooledEncoderClassifier, TorchTeacher, path_digest

    rng = np.random.default_rng(0)
    ids = rng.integers(1, 100, (records, 12)).astype(np.int64)
    text = SplitData({"input_ids": ids, "attention_mask": np.ones_like(ids)}, rng.integers(0, 2, records),
                     np.arange(records))
    encoder = BertModel(BertConfig(vocab_size=100, hidden_size=24, num_hidden_layers=1, num_attention_heads=2,
                                   intermediate_size=32))
    teacher = PooledEncoderClassifier(encoder, nn.Linear(24, 2))
    torch.save(teacher, directory / "unused.pt")
    site = create_site(directory / "text-site", "text-site", {"train": text, "val": text, "test": text},
                       directory / "unused.pt", teacher_declaration=PUBLIC_TEACHER)
    TeacherLogitCache(site.state_dir).outputs(
        text, path_digest(site.teacher_path), lambda: TorchTeacher(teacher, ("input_ids", "attention_mask")))
    return site


def plain_reply(coordinator, server_round: int, site: str, arrays: dict, num_examples=10, train_loss=0.1,
                ledger_seq: int = 5, **changes):
    """A well-formed plain reply to the coordinator's instruction of ``server_round``; ``changes`` replace fields."""
    from coordinator.replies import SiteReply

    instruction = coordinator.instruction(server_round)
    privacy = {"delta": 1e-5, "noise-multiplier": 1.1, "sample-rate": 0.1, "steps": 3, "empty-batches": 0,
               "accountant": "prv", "max-grad-norm": 1.0, "epsilon-run": 0.5, "epsilon-lifetime": 0.5,
               "ledger-seq": ledger_seq, "ledger-hash": "ab" * 32}
    fields = {"site": site, "arrays": arrays, "num_examples": num_examples, "train_loss": train_loss,
              "privacy": privacy, "binding": instruction.binding(), "source": f"node-{site}"}
    return SiteReply(**(fields | changes))
