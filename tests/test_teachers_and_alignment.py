import numpy as np
import pytest
import torch
from torch import nn
from transformers import BertConfig, BertForSequenceClassification, BertModel

from client.site import create_site
from client.train import train_round
from coordinator.rounds import Coordinator
from distill.data import SplitData
from distill.models import PooledEncoderClassifier, TorchTeacher, load_teacher, save_sklearn_teacher
from protocols.errors import ConfigError, DataError
from tests.helpers import TINY_BERT, federation, tabular_split


def test_every_teacher_kind_loads_from_disk_and_yields_logits(tmp_path):
    data = tabular_split(20, 0)
    from sklearn.linear_model import LogisticRegression

    save_sklearn_teacher(LogisticRegression().fit(data.inputs["x"], data.labels), tmp_path / "lr.pkl")
    assert load_teacher(tmp_path / "lr.pkl").logits(data.inputs).shape == (20, 2)

    module = nn.Sequential(nn.Linear(5, 3))
    torch.jit.script(module).save(str(tmp_path / "net.pt"))
    scripted = load_teacher(tmp_path / "net.pt")
    assert np.allclose(scripted.logits(data.inputs), module(torch.from_numpy(data.inputs["x"])).detach().numpy(),
                       atol=1e-6)

    np.savez(tmp_path / "logits.npz", logits=np.ones((20, 2), np.float32))
    assert load_teacher(tmp_path / "logits.npz").logits(data.inputs).shape == (20, 2)
    with pytest.raises(DataError, match="20 rows"):
        load_teacher(tmp_path / "logits.npz").logits(tabular_split(7, 1).inputs)

    config = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, num_labels=3)
    BertForSequenceClassification(config).save_pretrained(str(tmp_path / "bert"))
    text = {"input_ids": np.random.default_rng(0).integers(1, 50, (4, 8)), "attention_mask": np.ones((4, 8), np.int64)}
    assert load_teacher(tmp_path / "bert").logits(text).shape == (4, 3)

    with pytest.raises(ConfigError, match="does not exist"):
        load_teacher(tmp_path / "missing.pkl")


def test_hidden_state_alignment_trains_a_site_local_projection(tmp_path):
    rng = np.random.default_rng(0)
    ids = rng.integers(1, 100, (24, 12)).astype(np.int64)
    text = SplitData({"input_ids": ids, "attention_mask": np.ones_like(ids)}, rng.integers(0, 2, 24), np.arange(24))
    encoder = BertModel(BertConfig(vocab_size=100, hidden_size=24, num_hidden_layers=1, num_attention_heads=2,
                                   intermediate_size=32))
    teacher = PooledEncoderClassifier(encoder, nn.Linear(24, 2))
    # The cache is filled below, as round 1 would; the site then never needs to load this file itself.
    torch.save(teacher, tmp_path / "unused.pt")
    site = create_site(tmp_path / "site", "site-t", {"train": text, "val": text, "test": text},
                       tmp_path / "unused.pt")
    from distill.cache import TeacherLogitCache
    from distill.models import path_digest

    outputs = TeacherLogitCache(site.state_dir).outputs(
        text, path_digest(site.teacher_path), lambda: TorchTeacher(teacher, ("input_ids", "attention_mask")))
    assert outputs.hidden.shape == (24, 24)
    config = federation(student=TINY_BERT, hidden_alignment_weight=1.0, batch_size=8, optimizer="adam",
                        learning_rate=1e-3)
    coordinator = Coordinator(config, "run", tmp_path / "run")
    update = train_round(site, coordinator.instruction(1), coordinator.state)
    assert (site.state_dir / "alignment.pt").is_file()
    assert not any(name.startswith("projection") for name in update.arrays)  # the projection never leaves the site
