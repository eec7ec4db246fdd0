"""One round at a site: check the budget, validate the instruction, distill into the planned fragments, return only those."""

from __future__ import annotations

import functools
import io
import json
import logging
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from client.budget import Decision, calibrate, decide, planned_spend, record_refusal, record_spend
from client.evaluation import planned_evaluation_spends
from client.knowledge import (check_knowledge_inputs, keep_own_student, knowledge_release, own_student_spec,
                              prepare_own_student)
from client.pate import make_pate_release, pending_pate_spend
from client.preprocessing import check_preprocessing
from client.privacy import private_distill, private_distill_causal, units_of_privacy
from client.replay import TrainingSet, training_set
from client.site import Site
from client.teacher import check_teacher_for_run
from distill.cache import ContinuationCache, TeacherLogitCache, TopKTargetCache
from distill.causal_lm import CausalLMTeacher, causal_lm_digest, load_causal_lm_teacher
from distill.causal_train import (CausalTrainSettings, distill_causal, split_sequences, teacher_continuations,
                                  teacher_targets)
from distill.data import SplitData
from distill.models import (build_student, fragment_parameter_names, load_student_state, load_teacher,
                            parameter_names, student_state, teacher_digest)
from distill.token_kd import TopKTargets
from distill.train import TrainOutcome, TrainSettings, distill
from distill.vocabulary import VocabularySubset, vocabulary_of
from protocols.accounting import Calibration, PrivacyState, SitePolicy, Spend, epsilon_of, json_epsilon
from protocols.canonical import atomic_write_bytes, atomic_write_json, digest_arrays, sha256_hex
from protocols.config import StudentSpec
from protocols.errors import BudgetExhausted, ConfigError, UpdateRejected
from protocols.fragments import fragment_spec_for
from protocols.knowledge import SOFT_LABELS
from protocols.ledger import Ledger, key_fingerprint, ledger_in, read_events, verify_signature
from protocols.messages import TrainInstruction, check_fragment_update, check_tensors, clip_fragment_changes
from protocols.secagg import EncodedUpdate, encode_update

log = logging.getLogger("fedistill.site")
CLIPPING_FILE = "secagg_clipping.json"
# Sequences per teacher forward pass while a site builds its top-k cache: one batch of full-vocabulary logits
# (8 x 64 x 262,144 float32 is 0.5 GiB for Gemma) exists at a time.
TEACHER_BATCH = 8


@dataclass(frozen=True)
class SiteUpdate:
    arrays: dict[str, np.ndarray]
    num_examples: int
    train_loss: float
    steps: int
    privacy: dict[str, float | int | str]
    # Fragments whose change the site scaled down to the run's max_update_norm before sending.
    norm_clipped: tuple[str, ...]
    # The coordinator's signed checkpoint that came with the instruction (check_anchor), recorded with the update.
    anchor: dict[str, int | str]


@dataclass(frozen=True)
class BudgetCheck:
    policy: SitePolicy
    state: PrivacyState
    calibration: Calibration | None
    spend: Spend
    decision: Decision
    anchor: dict[str, int | str]
    # The PATE release this round makes and charges besides its DP-SGD steps (client/pate.py), if any.
    pate: Spend | None = None


def derived_seed(*parts: object) -> int:
    return int(sha256_hex(":".join(str(p) for p in parts))[:8], 16)


def _alignment_projection(site: Site, student_dim: int, teacher_dim: int) -> torch.nn.Module:
    """The site's own projection (never sent): created once, then reloaded from the state directory each round."""
    path = site.state_dir / "alignment.pt"
    projection = torch.nn.Linear(student_dim, teacher_dim)
    if path.is_file():
        projection.load_state_dict(torch.load(path, weights_only=True))
    return projection


def _run_history(site: Site, run_id: str) -> tuple[dict | None, int]:
    """This run's run-accepted payload in the site's own ledger (None before), and the last anchor seq recorded."""
    path = site.state_dir / "ledger.jsonl"
    accepted, last_anchor = None, -1
    for event in read_events(path) if path.is_file() else []:
        payload = event["payload"]
        if payload.get("run_id") != run_id:
            continue
        if event["kind"] == "run-accepted":
            accepted = payload
        if "coordinator_anchor" in payload:
            last_anchor = max(last_anchor, int(payload["coordinator_anchor"]["seq"]))
    return accepted, last_anchor


def check_anchor(site: Site, instruction: TrainInstruction, pinned: str | None, last_seq: int) -> dict[str, int | str]:
    """The coordinator's signed checkpoint this instruction carries: its key must be the one the site pinned when it
    accepted the run, its signature must verify, and it may not go back before one the site recorded already.
    Returns what the site records of it, so that the coordinator's ledger cannot later be cut back or re-signed."""
    what = f"site {site.name}, round {instruction.server_round} of run {instruction.run_id}"
    anchor = instruction.anchor
    if anchor is None:
        raise UpdateRejected(f"{what}: the instruction carries no signed coordinator checkpoint; nothing is trained "
                             "for a coordinator whose ledger the site cannot anchor.")
    try:
        fingerprint = key_fingerprint(anchor.public_key)
    except ConfigError as err:
        raise UpdateRejected(f"{what}: the coordinator's key is unusable ({err}).") from None
    if pinned is not None and fingerprint != pinned:
        raise UpdateRejected(f"{what}: the coordinator's ledger key is {fingerprint}, not {pinned}, the key this site "
                             "pinned when it accepted the run. Ask the consortium operator why the key changed.")
    if not verify_signature(anchor.public_key, anchor.hash, anchor.signature):
        raise UpdateRejected(f"{what}: the coordinator's checkpoint signature does not verify.")
    if anchor.seq < last_seq:
        raise UpdateRejected(f"{what}: the coordinator's checkpoint is at seq {anchor.seq}, before seq {last_seq} "
                             "that this site recorded already; the coordinator's ledger went back.")
    return {"seq": anchor.seq, "hash": anchor.hash, "signature": anchor.signature, "key_fingerprint": fingerprint}


def check_budget(site: Site, instruction: TrainInstruction, data: SplitData,
                 chosen: TrainingSet | None = None) -> BudgetCheck:
    """The site's decision on a round, before any training: calibrates sigma on the run's first round, for the
    units of privacy (persons or records, :func:`client.privacy.units_of_privacy`) of the ``data`` it trains on.

    The first instruction of a run is recorded as ``run-accepted``, with the calibration and the fingerprint of the
    coordinator's ledger key, which every later instruction's checkpoint must be signed with (:func:`check_anchor`).
    A refusal is recorded in the site's state and raised as :class:`BudgetExhausted` carrying the decision.
    """
    policy = SitePolicy.load(site.state_dir)
    state = PrivacyState.load(site.state_dir)
    unit, records = units_of_privacy(data, instruction.privacy_unit)
    delta = policy.delta_for(records, instruction.target_delta)
    accepted, last_anchor = _run_history(site, instruction.run_id)
    anchor = check_anchor(site, instruction, accepted and accepted["coordinator_key_fingerprint"], last_anchor)
    teacher = None
    if accepted is None:
        # Before anything is calibrated or recorded: a DP run on a private, non-DP teacher is refused outright.
        digest = (causal_lm_digest(site.teacher_path) if instruction.student.family == "causal_lm"
                  else teacher_digest(site.teacher_path))
        teacher = check_teacher_for_run(site.teacher_declaration, instruction.private, site.name, digest)
    pate = pending_pate_spend(site, instruction)
    calibration = state.calibrations.get(instruction.run_id) if instruction.private else None
    if instruction.private and calibration is None:
        # A PATE run's one release and the noised test evaluations are planned with the DP-SGD steps: sigma is
        # calibrated for their composition.
        planned = ([] if pate is None else [pate]) + planned_evaluation_spends(policy, instruction.run_id,
                                                                               instruction.evaluation_rounds)
        calibration = calibrate(instruction.run_id, instruction.target_epsilon, delta, records,
                                instruction.batch_size, instruction.total_rounds * instruction.local_steps,
                                instruction.max_grad_norm, policy.accountant, also_planned=planned, unit=unit)
        state.calibrations[instruction.run_id] = calibration
        state.save(site.state_dir)
    if accepted is None:
        site_ledger(site).append("run-accepted", {
            "run_id": instruction.run_id, "config_hash": instruction.config_hash, "policy": policy.to_dict(),
            "calibration": asdict(calibration) if calibration else None,
            "coordinator_key_fingerprint": anchor["key_fingerprint"], "coordinator_anchor": anchor,
            "teacher": teacher, "evaluation_rounds": list(instruction.evaluation_rounds),
            "test_metrics": policy.test_metrics} | ({"training_set": chosen.summary()} if chosen is not None else {})
            # The site's own records of processing, signed here so the report reads them from the evidence.
            | ({"governance": site.governance.to_dict()} if site.governance is not None else {})
            # The preprocessing its features were made with (consider_round checked it is the run's).
            | ({"preprocessing_digest": instruction.preprocessing_digest}
               if instruction.preprocessing_digest is not None else {}))
    if calibration is not None:
        delta = calibration.delta
    spend = planned_spend(instruction.run_id, instruction.server_round, instruction.local_steps, calibration)
    decision = decide(policy, state, spend, delta, also=[] if pate is None else [pate])
    if not decision.accept:
        if record_refusal(site.state_dir, state, site.name, instruction.run_id, instruction.server_round, decision):
            site_ledger(site).append("refusal", {"run_id": instruction.run_id, "round": instruction.server_round,
                                                 "config_hash": instruction.config_hash,
                                                 "coordinator_anchor": anchor, **decision.to_dict()})
        raise BudgetExhausted(f"site {site.name} refuses round {instruction.server_round}: {decision.reason}.",
                              decision.to_dict())
    return BudgetCheck(policy, state, calibration, spend, decision, anchor, pate)


def privacy_report(check: BudgetCheck, spend: Spend) -> dict[str, float | int | str]:
    """What the site tells the coordinator about its own budget after a round (never about its records)."""
    after = epsilon_of(check.state.run_spends(spend.run_id), check.decision.delta, check.policy.accountant)
    lifetime = epsilon_of(check.state.spends, check.decision.delta, check.policy.accountant)
    return {"delta": check.decision.delta, "noise-multiplier": spend.noise_multiplier,
            "sample-rate": spend.sample_rate, "steps": spend.steps, "empty-batches": spend.empty_batches,
            "accountant": check.policy.accountant,
            "max-grad-norm": check.calibration.max_grad_norm if check.calibration else 0.0,
            "epsilon-run": json_epsilon(after), "epsilon-lifetime": json_epsilon(lifetime)}


def _secret_seed(site: Site, instruction: TrainInstruction) -> int:
    # 60 bits from the site's secret: the coordinator knows run id and round, never the secret.
    return site.noise_seed(instruction.run_id, instruction.server_round)


def _distill_classifier(site: Site, instruction: TrainInstruction, student: torch.nn.Module, train: SplitData,
                        trainable: tuple[str, ...], check: BudgetCheck, chosen: TrainingSet) -> tuple[TrainOutcome, Spend]:
    # The teacher's outputs are cached for the whole training split; the run trains on the chosen records.
    cache = TeacherLogitCache(site.state_dir)
    outputs = cache.outputs(train, teacher_digest(site.teacher_path), lambda: load_teacher(site.teacher_path))
    data = train.subset(chosen.indices)
    outputs = replace(outputs, logits=outputs.logits[chosen.indices],
                      hidden=None if outputs.hidden is None else outputs.hidden[chosen.indices])
    projection = None
    if instruction.hidden_alignment_weight > 0 and outputs.hidden is not None:
        projection = _alignment_projection(site, student.config.hidden_size, outputs.hidden.shape[1])
    settings = TrainSettings(steps=instruction.local_steps, batch_size=instruction.batch_size,
                             learning_rate=instruction.learning_rate,
                             optimizer=instruction.optimizer, temperature=instruction.temperature,
                             alpha=instruction.alpha, hidden_alignment_weight=instruction.hidden_alignment_weight,
                             seed=derived_seed(instruction.seed, instruction.server_round, site.name))
    if check.calibration is not None:
        outcome, spend = private_distill(student, instruction.student.family, data, outputs.logits,
                                         settings, trainable, check.calibration, instruction.grad_sample_mode,
                                         check.state.spends, instruction.run_id, instruction.server_round,
                                         _secret_seed(site, instruction))
    else:
        outcome = distill(student, instruction.student.family, data, outputs.logits, settings, trainable,
                          teacher_hidden=outputs.hidden, projection=projection)
        spend = check.spend
    if projection is not None:
        buffer = io.BytesIO()
        torch.save(projection.state_dict(), buffer)
        atomic_write_bytes(site.state_dir / "alignment.pt", buffer.getvalue())
    return outcome, spend


def causal_training_texts(site: Site, instruction: TrainInstruction, data: SplitData,
                          teacher: Callable[[], CausalLMTeacher]) -> SplitData:
    """The site's training documents as the round trains on them: with sequence-level KD
    (``continuation_tokens``), each followed by the continuation its teacher writes (generated in the first round,
    cached in the state directory, recorded in the site's ledger, never sent); otherwise the documents."""
    new_tokens = instruction.student.causal_lm().continuation_tokens
    if not new_tokens:
        return data

    def generate() -> dict[str, np.ndarray]:
        loaded = teacher()
        input_ids, attention_mask = split_sequences(data)
        return teacher_continuations(loaded.model, input_ids, attention_mask, new_tokens, TEACHER_BATCH,
                                     loaded.tokenizer.pad_token_id)

    cached = ContinuationCache(site.state_dir).continued(data, causal_lm_digest(site.teacher_path), new_tokens,
                                                          generate)
    if cached.computed is not None:
        site_ledger(site).append("teacher-continuations-cached", {"run_id": instruction.run_id,
                                                                  "round": instruction.server_round,
                                                                  **cached.computed, "sent": False})
    return cached.data


def causal_teacher_targets(site: Site, instruction: TrainInstruction, data: SplitData, vocab_size: int,
                           vocabulary: VocabularySubset | None, teacher: Callable[[], CausalLMTeacher]) -> TopKTargets:
    """The site's causal-LM teacher's top-k targets on its training texts: computed in the first round (the
    teacher's only forward passes), cached in the state directory, recorded in the site's ledger, never sent.
    ``vocab_size`` is the student's; with a ``vocabulary`` subset the targets are over the student's ids.
    ``teacher`` loads the teacher once for the continuations and the targets."""
    settings = instruction.student.causal_lm()
    teacher_vocab = vocabulary.teacher_vocab_size if vocabulary is not None else vocab_size

    def compute() -> TopKTargets:
        loaded = teacher()
        rows = loaded.model.get_output_embeddings().weight.shape[0]
        if rows != teacher_vocab:
            raise UpdateRejected(f"site {site.name}: the teacher '{site.teacher_path}' predicts {rows} tokens, the "
                                 f"student's tokenizer has {teacher_vocab}; token-level targets need the teacher's "
                                 "tokenizer in both.")
        input_ids, attention_mask = split_sequences(data)
        return teacher_targets(loaded.model, input_ids, attention_mask, settings.top_k, TEACHER_BATCH,
                               settings.temperatures, vocabulary, settings.teacher_hidden_layers)

    cached = TopKTargetCache(site.state_dir).targets(data, causal_lm_digest(site.teacher_path), settings.top_k,
                                                     settings.temperatures, compute, settings.teacher_hidden_layers)
    if cached.computed is not None:
        site_ledger(site).append("teacher-targets-cached", {"run_id": instruction.run_id,
                                                            "round": instruction.server_round, **cached.computed,
                                                            "sent": False})
    if cached.targets.vocab_size != vocab_size:
        raise UpdateRejected(f"site {site.name}: the cached teacher targets cover {cached.targets.vocab_size} tokens, "
                             f"the student predicts {vocab_size}.")
    return cached.targets


def _distill_causal_lm(site: Site, instruction: TrainInstruction, student: torch.nn.Module, data: SplitData,
                       trainable: tuple[str, ...], check: BudgetCheck) -> tuple[TrainOutcome, Spend]:
    spec = instruction.student.causal_lm()
    vocabulary = vocabulary_of(student)
    teacher = functools.cache(lambda: load_causal_lm_teacher(site.teacher_path))  # loaded at most once, on a miss
    data = causal_training_texts(site, instruction, data, teacher)
    targets = causal_teacher_targets(site, instruction, data, student.get_output_embeddings().weight.shape[0],
                                     vocabulary, teacher)
    if vocabulary is not None:
        data = vocabulary.remap_split(data)  # the teacher read the texts in its own ids; the student reads its own
    settings = CausalTrainSettings(steps=instruction.local_steps, batch_size=instruction.batch_size,
                                   learning_rate=instruction.learning_rate, temperature=instruction.temperature,
                                   alpha=instruction.alpha,
                                   seed=derived_seed(instruction.seed, instruction.server_round, site.name),
                                   divergence=spec.divergence, beta=spec.beta, optimizer=instruction.optimizer,
                                   alignment_weight=spec.alignment_weight,
                                   alignment_layers=tuple(student for student, _ in spec.alignment))
    if check.calibration is not None:
        return private_distill_causal(student, data, targets, settings, trainable, check.calibration,
                                      check.state.spends, instruction.run_id, instruction.server_round,
                                      _secret_seed(site, instruction), instruction.grad_sample_mode)
    return distill_causal(student, data, targets, settings, trainable), check.spend


def site_student(site: Site, instruction: TrainInstruction) -> torch.nn.Module:
    """The round's student as this site builds it: a causal LM from the site's own copy of the run's base folder
    (site.toml's ``[student] base``) when it has one, checked against the spec's ``base_digest`` all the same."""
    spec = instruction.student
    if spec.family == "causal_lm" and site.student_base is not None:
        spec = StudentSpec("causal_lm", {**spec.settings, "base": str(site.student_base)})
    return build_student(spec)


def _check_causal_data(site: Site, instruction: TrainInstruction, data: SplitData) -> None:
    width = data.inputs["input_ids"].shape[1]
    expected = instruction.student.causal_lm().max_length
    if width != expected:
        raise UpdateRejected(f"site {site.name}: its texts are tokenized to {width} tokens ([data] max_length), the "
                             f"run's student expects {expected}; set [data] max_length = {expected} and run "
                             "`fedistill site start` again.")


def _begin_round(site: Site, instruction: TrainInstruction) -> tuple[SplitData, BudgetCheck, TrainingSet | None]:
    """What every round does before training: the data checks, the budget's decision, and (the run's first accepted
    round of a PATE run) the PATE release, charged before it is made."""
    train = site.splits()["train"]
    if len(train) == 0:
        raise UpdateRejected(f"site {site.name}: the training split is empty; nothing to train on.")
    if instruction.student.family == "causal_lm":
        _check_causal_data(site, instruction, train)
    # The records this run trains on here: all of them, or an incremental run's new ones plus its replay buffer.
    check, chosen = consider_round(site, instruction, train)
    if check.pate is not None:
        # The release's noise stream: the site's secret, the run, and nothing the coordinator could choose.
        make_pate_release(site, instruction, check.state, check.pate,
                          site.noise_seed(instruction.run_id, "pate"))
    return train, check, chosen


def train_round(site: Site, instruction: TrainInstruction, global_state: Mapping[str, np.ndarray],
                student: torch.nn.Module | None = None) -> SiteUpdate:
    """One round's local training; ``student`` is the freshly built student when the caller built it already."""
    train, check, chosen = _begin_round(site, instruction)
    family = instruction.student.family
    torch.manual_seed(derived_seed(instruction.seed, "init", site.name))
    student = student if student is not None else site_student(site, instruction)
    check_tensors(global_state, student_state(student, family),
                  f"round {instruction.server_round} global student received by {site.name}")
    spec = fragment_spec_for(family, fragment_parameter_names(student, family))
    trainable = spec.parameters_of_all(instruction.fragments)
    load_student_state(student, family, global_state)
    if chosen is None:
        outcome, spend = _distill_causal_lm(site, instruction, student, train, trainable, check)
    else:
        outcome, spend = _distill_classifier(site, instruction, student, train, trainable, check, chosen)

    state = student_state(student, family)
    # Post-processing of the DP model: no privacy cost. The coordinator rejects any change beyond the bound.
    update, clipped = clip_fragment_changes({name: state[name] for name in trainable}, global_state, spec,
                                            instruction.fragments, instruction.max_update_norm)
    if clipped:
        log.info("site %s, round %d: change of fragment(s) %s scaled down to max_update_norm=%g", site.name,
                 instruction.server_round, ", ".join(clipped), instruction.max_update_norm)
    # The site checks its own update before anything leaves it.
    check_fragment_update(update, spec, instruction.fragments, global_state, f"{site.name}'s own update")
    record_spend(site.state_dir, check.state, spend)
    return SiteUpdate(update, outcome.examples, outcome.mean_loss, outcome.steps, privacy_report(check, spend),
                      clipped, check.anchor)


def train_own_student_round(site: Site, instruction: TrainInstruction, global_state: Mapping[str, np.ndarray],
                            spec: StudentSpec) -> tuple[SiteUpdate, torch.nn.Module, dict[str, Any]]:
    """A knowledge-mode round on this site's own student (client/knowledge.py): it digests the global student on
    the proxy inputs, trains every one of its parameters under DP-SGD as the run's student would be, and is kept
    for the next round. No weight leaves the site (the update is empty); only its soft labels do."""
    train, check, chosen = _begin_round(site, instruction)
    check_tensors(global_state, student_state(build_student(instruction.student), instruction.student.family),
                  f"round {instruction.server_round} global student received by {site.name}")
    torch.manual_seed(derived_seed(instruction.seed, "own-init", site.name))
    student, record = prepare_own_student(site, instruction, spec, global_state,
                                          derived_seed(instruction.seed, instruction.server_round, site.name, "digest"))
    assert chosen is not None, "an own student is an mlp: it trains on a chosen training set"
    outcome, spend = _distill_classifier(site, instruction, student, train, tuple(parameter_names(student)), check,
                                         chosen)
    keep_own_student(site, instruction, student)
    record_spend(site.state_dir, check.state, spend)
    return (SiteUpdate({}, outcome.examples, outcome.mean_loss, outcome.steps, privacy_report(check, spend), (),
                       check.anchor), student, record)


def site_training_set(site: Site, instruction: TrainInstruction, train: SplitData) -> TrainingSet:
    """The records this run trains on at this site (client/replay.py), chosen when the site first considers it."""
    def teacher_logits() -> np.ndarray:
        return TeacherLogitCache(site.state_dir).outputs(train, teacher_digest(site.teacher_path),
                                                         lambda: load_teacher(site.teacher_path)).logits

    trained_runs = {spend.run_id for spend in PrivacyState.load(site.state_dir).spends} - {instruction.run_id}
    return training_set(site.state_dir, site.name, instruction.run_id, instruction.training_records,
                        instruction.replay_min_entropy, train, site.noise_secret(), trained_runs, teacher_logits)


def consider_round(site: Site, instruction: TrainInstruction,
                   train: SplitData | None = None) -> tuple[BudgetCheck, TrainingSet | None]:
    """The site's answer to a round (its query, then its training message): its budget decides, for the records
    the run trains on here. A causal-LM run trains on every text (None: no training set is chosen).

    First of all, the site's features must come from the preprocessing the run pins: a refusal there spends nothing.
    """
    check_preprocessing(site, instruction)
    train = site.splits()["train"] if train is None else train
    if instruction.knowledge is not None:
        check_knowledge_inputs(site, instruction)
    chosen = None if instruction.student.family == "causal_lm" else site_training_set(site, instruction, train)
    return check_budget(site, instruction, train if chosen is None else train.subset(chosen.indices), chosen), chosen


def site_ledger(site: Site) -> Ledger:
    return ledger_in(site.state_dir, site.name)


def record_update_sent(site: Site, instruction: TrainInstruction, payload_kind: str, payload: dict[str, np.ndarray],
                       update: SiteUpdate, knowledge: dict[str, Any] | None = None) -> dict[str, float | int | str]:
    """What left the site this round, in its ledger, then a signed checkpoint; returns the report plus the head.

    The tensors are described (names, shapes, bytes, digest), never stored: the ledger holds no record and no
    update. The spend's DP parameters are what an auditor replays the site's epsilon from.
    """
    ledger = site_ledger(site)
    ledger.append("update-sent", {
        "run_id": instruction.run_id, "round": instruction.server_round, "config_hash": instruction.config_hash,
        "payload_kind": payload_kind,
        "tensors": [{"name": name, "shape": list(value.shape), "dtype": str(value.dtype)}
                    for name, value in payload.items()],
        "bytes": int(sum(value.nbytes for value in payload.values())), "digest": digest_arrays(payload),
        "dp": {key: update.privacy[key] for key in ("noise-multiplier", "sample-rate", "steps", "empty-batches",
                                                    "max-grad-norm", "delta", "accountant")},
        "norm_clipped": list(update.norm_clipped), "coordinator_anchor": update.anchor,
        "epsilon_run": update.privacy["epsilon-run"], "epsilon_lifetime": update.privacy["epsilon-lifetime"]}
        | ({"knowledge": knowledge} if knowledge is not None else {}))
    ledger.checkpoint({"run_id": instruction.run_id, "round": instruction.server_round})
    seq, head = ledger.head
    return {**update.privacy, "ledger-seq": seq, "ledger-hash": head}


def plain_train_round(site: Site, instruction: TrainInstruction, global_state: Mapping[str, np.ndarray]) -> SiteUpdate:
    """A round without secure aggregation: the planned fragments leave the site as they are."""
    update = train_round(site, instruction, global_state)
    report = record_update_sent(site, instruction, "plain fragment update", update.arrays, update)
    return replace(update, privacy=report)


def state_names(instruction: TrainInstruction, student: torch.nn.Module | None = None) -> list[str]:
    """The order of the student's tensors: both sides derive it from the student spec, never from the wire."""
    student = student if student is not None else build_student(instruction.student)
    return list(student_state(student, instruction.student.family))


def secure_train_round(site: Site, instruction: TrainInstruction,
                       global_arrays: list[np.ndarray]) -> tuple[EncodedUpdate, SiteUpdate]:
    """A round whose update leaves only through SecAgg+: train, then encode weight and update together."""
    own = own_student_spec(site, instruction)
    student = site_student(site, instruction)
    names = state_names(instruction, student)
    if len(global_arrays) != len(names):
        raise UpdateRejected(f"round {instruction.server_round}: {site.name} received {len(global_arrays)} tensors, "
                             f"the student has {len(names)}.")
    global_state = dict(zip(names, global_arrays))
    own_record = None
    if own is None:
        update = train_round(site, instruction, global_state, student)
    else:
        update, student, own_record = train_own_student_round(site, instruction, global_state, own)
    knowledge = instruction.knowledge
    planned = [] if knowledge is not None and not knowledge.sends_weights else [
        name for name in names if name in update.arrays]
    values, reference, release = dict(update.arrays), dict(global_state), None
    if knowledge is not None:
        # The soft labels travel as differences from zero, after the planned tensors: the layout every site shares.
        values[SOFT_LABELS], release = knowledge_release(site, instruction, student)
        if own_record is not None:
            release["own_student"] = own_record
        reference[SOFT_LABELS] = np.zeros(knowledge.soft_label_shape, dtype=np.float64)
        planned.append(SOFT_LABELS)
    encoded = encode_update(values, reference, planned, update.num_examples, update.train_loss,
                            instruction.clipping_range, instruction.weight_scale)
    if encoded.clipped_values:
        log.warning("site %s, round %d: %d value(s) of the secure-aggregation payload exceed the clipping range "
                    "%g and will be clipped by SecAgg+", site.name, instruction.server_round, encoded.clipped_values,
                    instruction.clipping_range)
    record_clipping(site.state_dir, instruction.run_id, instruction.server_round, encoded.clipped_values)
    payload = {f"secagg.{index}": vector for index, vector in enumerate(encoded.vectors)}
    report = record_update_sent(site, instruction, "secagg+ input (masked by Flower)", payload, update, release)
    return encoded, replace(update, privacy=report)


def record_clipping(state_dir: Path, run_id: str, server_round: int, clipped: int) -> None:
    """Per round, how many payload values SecAgg+ clips (Flower would clip them silently)."""
    path = Path(state_dir) / CLIPPING_FILE
    counts = json.loads(path.read_text()) if path.is_file() else {"schema_version": 1, "runs": {}}
    counts["runs"].setdefault(run_id, {})[str(server_round)] = clipped
    atomic_write_json(path, counts)
