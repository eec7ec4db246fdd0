"""A site's knowledge release: its soft labels on the run's registered proxy set (protocols/knowledge.py).

The release leaves the site only inside its SecAgg+ vector; the site's ledger records its source, shape,
temperature and digest, and why it is private: the DP step it post-processes, the public teacher it comes from, or
the PATE release of its private teacher ensemble that its accountant charged (client/pate.py).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.numpy import load_file, save

from client.pate import check_pate_teacher, kept_pate_release
from client.site import Site
from distill.causal_knowledge import next_token_release, proxy_prompts, real_positions, shared_token_ids
from distill.data import SplitData
from distill.evaluate import softmax
from distill.models import (build_student, count_parameters, load_numpy_state, load_student_state, load_teacher,
                            state_to_numpy, teacher_digest)
from distill.train import distil_to_probabilities, predict_proba, proxy_distillation
from protocols.canonical import atomic_write_bytes, digest_arrays, sha256_hex
from protocols.config import StudentSpec
from protocols.errors import UpdateRejected
from protocols.knowledge import PROXY_FILE, WHY_PRIVATE, KnowledgeSettings, check_soft_labels, load_proxy
from protocols.messages import TrainInstruction

def knowledge_release(site: Site, instruction: TrainInstruction, trained_student: torch.nn.Module
                      ) -> tuple[np.ndarray, dict[str, Any]]:
    """(the site's soft labels on the proxy set, what its ledger records of them). ``trained_student`` is the round's
    local student after its DP-SGD steps (the ``local-student`` source)."""
    knowledge = instruction.knowledge
    assert knowledge is not None
    who = f"site {site.name}, round {instruction.server_round}"
    proxy = load_proxy(site.state_dir / PROXY_FILE, knowledge, who)
    if knowledge.token_level:
        soft, origin = _token_release(trained_student, proxy, knowledge, who), {
            "post_processes": {"run_id": instruction.run_id, "round": instruction.server_round,
                               "local_steps": instruction.local_steps}}
    elif knowledge.source == "pate":
        soft, origin = kept_pate_release(site, instruction)
    elif knowledge.source == "public-teacher":
        _check_public_teacher(site, who)
        logits = load_teacher(site.teacher_path).logits(proxy)
        soft = softmax(np.asarray(logits, dtype=np.float64) / knowledge.temperature)
        origin: dict[str, Any] = {"teacher_digest": teacher_digest(site.teacher_path),
                                  "teacher_training_data": site.teacher_declaration.training_data}
    else:
        records = SplitData(proxy, np.zeros(len(next(iter(proxy.values()))), dtype=np.int64))
        soft = predict_proba(trained_student, instruction.student.family, records, temperature=knowledge.temperature)
        origin = {"post_processes": {"run_id": instruction.run_id, "round": instruction.server_round,
                                     "local_steps": instruction.local_steps}}
    soft = check_soft_labels(soft, knowledge, f"{who}'s own release")
    return soft, {"source": knowledge.source, "mode": knowledge.mode, "shape": list(soft.shape),
                  "temperature": knowledge.temperature, "proxy_digest": knowledge.proxy_digest,
                  "digest": digest_arrays({"soft_labels": soft}),
                  "why_private": WHY_PRIVATE[knowledge.source] if instruction.private or knowledge.source !=
                  "local-student" else "not private: the run has no privacy target", **origin}


def _token_release(student: torch.nn.Module, proxy: Mapping[str, np.ndarray], knowledge: KnowledgeSettings,
                   who: str) -> np.ndarray:
    """A causal-LM site's release: its local student's next-token distributions on the proxy prompts' real positions,
    folded onto the run's shared tokens and one bucket for the rest (distill/causal_knowledge.py)."""
    prompts = proxy_prompts(student, proxy)
    if real_positions(prompts.inputs) != knowledge.proxy_positions:
        raise UpdateRejected(f"{who}: the proxy prompts hold {real_positions(prompts.inputs)} real token positions, "
                             f"the run registers {knowledge.proxy_positions}.")
    vocab_size = student.get_output_embeddings().weight.shape[0]
    shared = shared_token_ids(prompts, knowledge.shared_tokens, vocab_size)
    return next_token_release(student, prompts, shared, knowledge.temperature)


def _check_public_teacher(site: Site, who: str) -> None:
    declared = site.teacher_declaration.training_data
    if declared != "public":
        raise UpdateRejected(f"{who}: the run asks for the soft labels of a public teacher, but this site declares its "
                             f"teacher's training data '{declared}' ([teacher] training_data); the outputs of a "
                             "teacher trained on private records are never released. Nothing is trained or sent.")


def check_knowledge_inputs(site: Site, instruction: TrainInstruction) -> None:
    """Before a site trains for a knowledge run (and so before it spends anything): its copy of the proxy set is the
    registered one (by SHA-256), and a public-teacher release comes from a teacher declared public."""
    knowledge = instruction.knowledge
    assert knowledge is not None
    who = f"site {site.name}, round {instruction.server_round}"
    load_proxy(site.state_dir / PROXY_FILE, knowledge, who)
    if knowledge.source == "public-teacher":
        _check_public_teacher(site, who)
    if knowledge.source == "pate":
        check_pate_teacher(site, who)


# A site's own knowledge-mode student, kept between the rounds of a run (never sent).
OWN_STUDENT_FILE = "own-student-{run}.safetensors"


def own_student_spec(site: Site, instruction: TrainInstruction) -> StudentSpec | None:
    """The student this site trains instead of the run's: its own MLP widths, in a ``knowledge``-mode run only (in
    the other modes its weights travel, so they must be the run's). None: the run's student."""
    knowledge = instruction.knowledge
    if (site.knowledge_student_hidden is None or knowledge is None or knowledge.mode != "knowledge"
            or instruction.student.family != "mlp"):
        return None
    return StudentSpec("mlp", {**instruction.student.settings, "hidden": list(site.knowledge_student_hidden)})


def own_student_path(site: Site, run_id: str) -> Path:
    return site.state_dir / OWN_STUDENT_FILE.format(run=sha256_hex(run_id)[:16])


def prepare_own_student(site: Site, instruction: TrainInstruction, spec: StudentSpec,
                        global_state: Mapping[str, np.ndarray], seed: int) -> tuple[torch.nn.Module, dict[str, Any]]:
    """This site's own student for the round: as it kept it after its last round of the run (a fresh one seeded by
    the run on its first), then distilled from the global student on the public proxy inputs (free: public inputs,
    and the global student is what every site received), FedMD's digest step."""
    knowledge = instruction.knowledge
    assert knowledge is not None
    who = f"site {site.name}, round {instruction.server_round}"
    student = build_student(spec)
    kept = own_student_path(site, instruction.run_id)
    if kept.is_file():
        load_numpy_state(student, load_file(str(kept)))
    global_student = build_student(instruction.student)
    load_student_state(global_student, instruction.student.family, global_state)
    proxy = load_proxy(site.state_dir / PROXY_FILE, knowledge, who)
    records = SplitData(proxy, np.zeros(len(next(iter(proxy.values()))), dtype=np.int64))
    targets = predict_proba(global_student, instruction.student.family, records, temperature=knowledge.temperature)
    outcome = distil_to_probabilities(student, spec.family, proxy, targets, proxy_distillation(knowledge, seed))
    return student, {"spec": spec.to_dict(), "parameters": count_parameters(student),
                     "continued": kept.is_file(), "digest_steps": outcome.steps}


def keep_own_student(site: Site, instruction: TrainInstruction, student: torch.nn.Module) -> None:
    """Written atomically: a crash leaves the previous round's copy."""
    atomic_write_bytes(own_student_path(site, instruction.run_id), save(state_to_numpy(student)))
