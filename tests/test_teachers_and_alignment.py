import numpy as np
import pytest
import torch
from torch import nn
from transformers import BertConfig, BertForSequenceClassification

from client.train import train_round
from coordinator.rounds import Coordinator
from distill.cache import TeacherLogitCache
from distill.models import load_teacher, path_digest, save_sklearn_teacher
from protocols.errors import ConfigError, DataError
from tests.helpers import TINY_BERT, federation, tabular_split, text_site


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
    # The teacher's outputs (logits and pooled hidden states) are cached as round 1 would leave them.
    site = text_site(tmp_path)
    cached = TeacherLogitCache(site.state_dir).outputs(site.splits()["train"], path_digest(site.teacher_path),
                                                       lambda: None)
    assert cached.hidden.shape == (24, 24)
    config = federation(student=TINY_BERT, hidden_alignment_weight=1.0, batch_size=8, optimizer="adam",
                        learning_rate=1e-3)
    coordinator = Coordinator(config, "run", tmp_path / "run")
    update = train_round(site, coordinator.instruction(1), coordinator.state)
    assert (site.state_dir / "alignment.pt").is_file()
    assert not any(name.startswith("projection") for name in update.arrays)  # the projection never leaves the site
