"""A site's knowledge release: its soft labels on the run's registered proxy set (protocols/knowledge.py).

The release leaves the site only inside its SecAgg+ vector; the site's ledger records its source, shape,
temperature and digest, and why it is private: the DP step it post-processes, the public teacher it comes from, or
the PATE release of its private teacher ensemble that its accountant charged (client/pate.py).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from client.pate import check_pate_teacher, kept_pate_release
from client.site import Site
from distill.evaluate import softmax
from distill.data import SplitData
from distill.models import load_teacher, teacher_digest
from distill.train import predict_proba
from protocols.canonical import digest_arrays
from protocols.errors import UpdateRejected
from protocols.knowledge import PROXY_FILE, WHY_PRIVATE, check_soft_labels, load_proxy
from protocols.messages import TrainInstruction

def knowledge_release(site: Site, instruction: TrainInstruction, trained_student: torch.nn.Module
                      ) -> tuple[np.ndarray, dict[str, Any]]:
    """(the site's soft labels on the proxy set, what its ledger records of them). ``trained_student`` is the round's
    local student after its DP-SGD steps (the ``local-student`` source)."""
    knowledge = instruction.knowledge
    assert knowledge is not None
    who = f"site {site.name}, round {instruction.server_round}"
    proxy = load_proxy(site.state_dir / PROXY_FILE, knowledge, who)
    if knowledge.source == "pate":
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
