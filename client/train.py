"""One round at a site: validate the instruction, distill into the planned fragments, return only those."""

from __future__ import annotations

import io
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch

from client.site import Site
from distill.cache import TeacherLogitCache
from distill.models import (build_student, load_numpy_state, load_teacher, parameter_names, state_to_numpy,
                            teacher_digest)
from distill.train import TrainSettings, distill
from protocols.canonical import atomic_write_bytes, sha256_hex
from protocols.errors import UpdateRejected
from protocols.fragments import fragment_spec_for
from protocols.messages import TrainInstruction, check_fragment_update, check_tensors


@dataclass(frozen=True)
class SiteUpdate:
    arrays: dict[str, np.ndarray]
    num_examples: int
    train_loss: float
    steps: int


def derived_seed(*parts: object) -> int:
    return int(sha256_hex(":".join(str(p) for p in parts))[:8], 16)


def _alignment_projection(site: Site, student_dim: int, teacher_dim: int) -> torch.nn.Module:
    """The site's own projection (never sent): created once, then reloaded from the state directory each round."""
    path = site.state_dir / "alignment.pt"
    projection = torch.nn.Linear(student_dim, teacher_dim)
    if path.is_file():
        projection.load_state_dict(torch.load(path, weights_only=True))
    return projection


def train_round(site: Site, instruction: TrainInstruction, global_state: Mapping[str, np.ndarray]) -> SiteUpdate:
    torch.manual_seed(derived_seed(instruction.seed, "init", site.name))
    student = build_student(instruction.student)
    expected = {name: tuple(t.shape) for name, t in student.state_dict().items()}
    check_tensors(global_state, expected, f"round {instruction.server_round} global student received by {site.name}")
    spec = fragment_spec_for(instruction.student.family, parameter_names(student))
    trainable = spec.parameters_of_all(instruction.fragments)
    load_numpy_state(student, global_state)

    splits = site.splits()
    if len(splits["train"]) == 0:
        raise UpdateRejected(f"site {site.name}: the training split is empty; nothing to train on.")
    cache = TeacherLogitCache(site.state_dir)
    outputs = cache.outputs(splits["train"], teacher_digest(site.teacher_path),
                            lambda: load_teacher(site.teacher_path))
    projection = None
    if instruction.hidden_alignment_weight > 0 and outputs.hidden is not None:
        projection = _alignment_projection(site, student.config.hidden_size, outputs.hidden.shape[1])
    settings = TrainSettings(steps=instruction.local_steps, batch_size=instruction.batch_size,
                             learning_rate=instruction.learning_rate,
                             optimizer=instruction.optimizer, temperature=instruction.temperature,
                             alpha=instruction.alpha, hidden_alignment_weight=instruction.hidden_alignment_weight,
                             seed=derived_seed(instruction.seed, instruction.server_round, site.name))
    outcome = distill(student, instruction.student.family, splits["train"], outputs.logits, settings, trainable,
                      teacher_hidden=outputs.hidden, projection=projection)
    if projection is not None:
        buffer = io.BytesIO()
        torch.save(projection.state_dict(), buffer)
        atomic_write_bytes(site.state_dir / "alignment.pt", buffer.getvalue())

    state = state_to_numpy(student)
    update = {name: state[name] for name in trainable}
    # The site checks its own update before anything leaves it.
    check_fragment_update(update, spec, instruction.fragments, expected, f"{site.name}'s own update")
    return SiteUpdate(update, outcome.examples, outcome.mean_loss, outcome.steps)
