"""What ``fedistill simulate`` does differently for a causal-LM scenario: evaluation, baselines, summary.

The federation itself is the one every scenario runs (simulations.runner, Flower's simulation engine). Here:

* :class:`CausalEvaluation`: each round, the global student's perplexity on every site's held-out texts and its
  top-1 agreement with the teacher (the teacher scored once);
* :func:`causal_baselines`: the teacher, the undistilled student (the layer subset, no KD), the public-only student
  (after a public stage) and centrally distilled students (all sites' texts pooled, the same optimizer steps and
  settings per round; non-private, and under DP at the run's epsilon);
* :func:`causal_summary`: ``summary.json`` for a causal-LM run (docs/report.md), with the sizes, CPU latency per
  generated token, each site's top-k cache and what left each site per round.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from client.budget import calibrate
from client.privacy import private_distill_causal
from distill.cache import ContinuationCache, TopKTargetCache
from distill.causal_lm import (causal_lm_digest, export_causal_lm_student, load_causal_lm_student,
                               parameter_counts, student_record)
from distill.causal_train import (CAUSAL_METRICS, CausalTrainSettings, distill_causal, evaluate_causal_lm,
                                  split_scores, split_sequences, teacher_continuations, teacher_targets)
from distill.data import SplitData
from distill.losses import temperature_at
from distill.models import build_student, fragment_parameter_names
from distill.token_kd import TopKTargets, concatenate_targets
from distill.vocabulary import vocabulary_of
from protocols.accounting import SitePolicy
from protocols.config import FederationConfig
from protocols.fragments import fragment_spec_for, planned_fragments
from protocols.ledger import read_events
from simulations.scenario import Scenario

EVAL_BATCH = 8
TEACHER_BATCH = 8
# CPU latency per generated token: greedy decoding with the KV cache, a few held-out prompts, after one warm-up.
LATENCY_PROMPTS, LATENCY_PROMPT_TOKENS, LATENCY_NEW_TOKENS = 4, 8, 16
MODEL_LABELS = {"teacher": "teacher", "federated": "federated student",
                "undistilled": "undistilled student (the layer subset, no KD)",
                "centralized_distilled": "centralized distilled student (non-private)"}
# With a public stage (coordinator.public_stage) the federation starts from a student already distilled on public
# text: the free alternative a site would try first, which the federation must beat.
PUBLIC_ONLY_LABEL = "public-only distilled student (no site data)"


class CausalEvaluation:
    """The coordinator's evaluator in a simulation: the teacher's token scores are computed once, up front."""

    def __init__(self, scenario: Scenario) -> None:
        self.tests = {name: splits["test"] for name, splits in scenario.sites.items()}
        self.teacher_scores = split_scores(scenario.teacher.model, self.tests, EVAL_BATCH)

    def __call__(self, model: nn.Module) -> dict[str, Any]:
        return evaluate_causal_lm(split_scores(model, self.tests, EVAL_BATCH), self.teacher_scores)


def site_training(scenario: Scenario, run_dir: Path, teacher_path: Path, config: FederationConfig
                  ) -> dict[str, tuple[SplitData, TopKTargets]]:
    """Each site's training texts as its rounds used them (with sequence-level KD, each document followed by its
    cached teacher continuation) and its cached top-k targets: the caches hit and the teacher does not run again
    (it runs only for a site that never trained)."""
    settings = config.student.causal_lm()
    digest = causal_lm_digest(teacher_path)
    vocabulary = vocabulary_of(_fresh_student(config))
    pad = scenario.teacher.tokenizer.pad_token_id
    out = {}
    for name, splits in scenario.sites.items():
        site_dir = run_dir / "sites" / name
        data = splits["train"]
        if settings.continuation_tokens:
            ids, mask = split_sequences(data)
            data = ContinuationCache(site_dir).continued(
                data, digest, settings.continuation_tokens,
                lambda: teacher_continuations(scenario.teacher.model, ids, mask, settings.continuation_tokens,
                                              TEACHER_BATCH, pad)).data
        ids, mask = split_sequences(data)
        out[name] = (data, TopKTargetCache(site_dir).targets(
            data, digest, settings.top_k, settings.temperatures,
            lambda: teacher_targets(scenario.teacher.model, ids, mask, settings.top_k, TEACHER_BATCH,
                                    settings.temperatures, vocabulary, settings.teacher_hidden_layers),
            settings.teacher_hidden_layers).targets)
    return out


def _fresh_student(config: FederationConfig) -> nn.Module:
    torch.manual_seed(config.seed)  # as the coordinator builds the round-0 student
    return build_student(config.student)


def centrally_distilled(scenario: Scenario, config: FederationConfig,
                        training: dict[str, tuple[SplitData, TopKTargets]], private: bool = False) -> nn.Module:
    """A central curator's student: every site's texts pooled, the federated run's settings and optimizer steps,
    round by round (so a temperature schedule and an optimizer restart per round are the same as in the federation).

    ``private``: DP-SGD at the run's epsilon on the pooled texts (one document is still the unit, delta by the same
    rule as a site's, for the pooled count), the comparison that separates what federation costs from what DP
    costs; otherwise non-private."""
    model = _fresh_student(config)
    family = config.student.family
    spec = fragment_spec_for(family, fragment_parameter_names(model, family), config.fragment_patterns)
    pooled = SplitData.concatenate([training[name][0] for name in scenario.sites])
    vocabulary = vocabulary_of(model)
    if vocabulary is not None:
        pooled = vocabulary.remap_split(pooled)
    pooled_targets = concatenate_targets([training[name][1] for name in scenario.sites])
    causal = config.student.causal_lm()
    calibration, spends = None, []
    if private:
        delta = SitePolicy().delta_for(len(pooled), config.target_delta)
        calibration = calibrate("centralized", config.target_epsilon, delta, len(pooled), config.batch_size,
                                config.rounds * config.local_steps, config.max_grad_norm, "prv")
    for server_round in range(1, config.rounds + 1):
        settings = CausalTrainSettings(
            steps=config.local_steps, batch_size=config.batch_size, learning_rate=config.learning_rate,
            temperature=temperature_at(server_round, config.rounds, config.temperature_schedule,
                                       config.temperature_start, config.temperature_end),
            alpha=config.alpha, seed=config.seed * 1000 + server_round, divergence=causal.divergence,
            beta=causal.beta, optimizer=config.optimizer, alignment_weight=causal.alignment_weight,
            alignment_layers=tuple(student for student, _ in causal.alignment))
        trainable = spec.parameters_of_all(planned_fragments(config.fragment_plan, spec, server_round, config.rounds))
        if calibration is None:
            distill_causal(model, pooled, pooled_targets, settings, trainable)
        else:
            _, spend = private_distill_causal(model, pooled, pooled_targets, settings, trainable, calibration, spends,
                                              "centralized", server_round, config.seed * 7919 + server_round,
                                              config.grad_sample_mode)
            spends.append(spend)
    return model


def model_labels(scenario: Scenario, config: FederationConfig) -> dict[str, str]:
    """The models a causal-LM run compares, keyed as in ``summary.json``'s ``models``."""
    return (MODEL_LABELS
            | ({"centralized_private": f"centralized distilled student, DP at epsilon {config.target_epsilon:g}"}
               if config.private else {})
            | ({"public_only": PUBLIC_ONLY_LABEL} if scenario.initial_student is not None else {}))


# The baselines that do not depend on the run's privacy level: a sweep trains them once.
PRIVACY_FREE_BASELINES = ("teacher", "centralized_distilled", "undistilled", "public_only")


def causal_baselines(scenario: Scenario, config: FederationConfig, evaluation: CausalEvaluation,
                     training: dict[str, tuple[SplitData, TopKTargets]],
                     reuse: dict[str, Any] | None = None) -> dict[str, Any]:
    """The teacher, the undistilled student, the centrally distilled one (non-private, and at the run's epsilon
    for a private run) and, after a public stage, the public-only one (the run's starting student: LoRA's B
    matrices start at zero, so it is the base itself). ``reuse``: an earlier run's on the same splits (a sweep),
    whose privacy-free baselines are kept."""
    if reuse is not None:
        out = {key: reuse[key] for key in PRIVACY_FREE_BASELINES if key in reuse}
    else:
        teacher = evaluate_causal_lm(evaluation.teacher_scores, evaluation.teacher_scores)
        out = {"teacher": teacher, "centralized_distilled": evaluation(centrally_distilled(scenario, config, training))}
        if scenario.initial_student is None:
            out["undistilled"] = evaluation(_fresh_student(config))
        else:
            out["undistilled"] = evaluation(load_causal_lm_student(scenario.initial_student))
            out["public_only"] = evaluation(_fresh_student(config))
    if config.private:
        out["centralized_private"] = evaluation(centrally_distilled(scenario, config, training, private=True))
    return out


@torch.no_grad()
def latency_ms_per_token(model: nn.Module, tests: dict[str, SplitData], pad_token_id: int) -> float:
    """Milliseconds per generated token, greedy with the KV cache, on the first held-out texts' openings."""
    prompts = np.concatenate([data.inputs["input_ids"][:LATENCY_PROMPTS, :LATENCY_PROMPT_TOKENS]
                              for data in tests.values()])[:LATENCY_PROMPTS]
    vocabulary = vocabulary_of(model)
    if vocabulary is not None:  # a subset student generates in its own ids
        prompts = vocabulary.student_ids(prompts)
        pad_token_id = int(vocabulary.student_ids(np.asarray([pad_token_id]))[0])
    was_training = model.training
    model.eval()
    try:
        def generate() -> float:
            started = time.perf_counter()
            for prompt in prompts:
                model.generate(torch.from_numpy(prompt).unsqueeze(0), max_new_tokens=LATENCY_NEW_TOKENS,
                               min_new_tokens=LATENCY_NEW_TOKENS, do_sample=False, pad_token_id=pad_token_id)
            return time.perf_counter() - started

        generate()  # warm-up: first calls allocate and pick kernels
        return 1000.0 * generate() / (len(prompts) * LATENCY_NEW_TOKENS)
    finally:
        model.train(was_training)


def _folder_bytes(path: Path) -> int:
    return path.stat().st_size if path.is_file() else sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _sent_per_round(state_dir: Path, run_id: str) -> dict[str, int]:
    sent = [e["payload"] for e in read_events(state_dir / "ledger.jsonl")
            if e["kind"] == "update-sent" and e["payload"].get("run_id") == run_id]
    if not sent:
        return {"bytes": 0, "tensors": 0, "rounds": 0}
    return {"bytes": int(statistics.median(p["bytes"] for p in sent)),
            "tensors": int(statistics.median(len(p["tensors"]) for p in sent)), "rounds": len(sent)}


def _vocabulary_summary(model: nn.Module, tests: dict[str, SplitData]) -> dict[str, Any]:
    """The student's vocabulary against the teacher's, and how much of the held-out text it covers."""
    vocabulary = vocabulary_of(model)
    if vocabulary is None:
        return {"subset": False, "student_tokens": int(model.get_output_embeddings().weight.shape[0])}
    predicted = np.concatenate([data.inputs["input_ids"][:, 1:][data.inputs["attention_mask"][:, 1:] == 1]
                                for data in tests.values()])
    return {"subset": True, "student_tokens": vocabulary.size, "teacher_tokens": vocabulary.teacher_vocab_size,
            "kept_teacher_tokens": len(vocabulary.teacher_ids), "dropped_teacher_tokens": vocabulary.dropped,
            "chosen_from": "the most frequent teacher tokens of the public corpus, plus the special tokens",
            "held_out_token_coverage": float(np.mean(vocabulary.student_ids(predicted) != vocabulary.oov_id)),
            "oov_rule": "a held-out token outside the subset costs -log p(<oov>) + log(dropped tokens): perplexity "
                        "stays over the teacher's full vocabulary"}


def causal_summary(scenario: Scenario, config: FederationConfig, coordinator: Any, run_dir: Path,
                   teacher_path: Path, baselines: dict[str, Any], evaluation: CausalEvaluation, run_id: str
                   ) -> dict[str, Any]:
    """The causal-LM part of ``summary.json``; the harness adds run identity, privacy and timings."""
    final = coordinator.records[-1]
    federated = final["evaluation"] if "evaluation" in final else evaluation(coordinator.model)
    models = {"federated": federated, **baselines}
    causal = config.student.causal_lm()
    exported = export_causal_lm_student(coordinator.model, run_dir / "student_model", scenario.teacher.tokenizer)
    teacher_counts = parameter_counts(scenario.teacher.model)
    student_counts = parameter_counts(coordinator.model)
    base_counts = parameter_counts(_fresh_student(config).get_base_model()) if causal.lora else student_counts
    pad = scenario.teacher.tokenizer.pad_token_id
    teacher_latency = latency_ms_per_token(scenario.teacher.model, evaluation.tests, pad)
    student_latency = latency_ms_per_token(coordinator.model, evaluation.tests, pad)
    labels = model_labels(scenario, config)
    comparison = {key: models[key]["overall"]["perplexity"] for key in labels}
    for other, name in (("centralized_distilled", "federated_over_centralized"),
                        ("centralized_private", "federated_over_centralized_private"),
                        ("undistilled", "federated_over_undistilled"), ("public_only", "federated_over_public_only")):
        if comparison["federated"] and comparison.get(other):
            comparison[name] = comparison["federated"] / comparison[other]
    caches = {}
    for name in scenario.sites:
        cache = TopKTargetCache(run_dir / "sites" / name)
        meta = cache.metadata()
        caches[name] = {"positions": meta.get("positions"), "bytes": meta.get("bytes"),
                        "teacher_forward_passes": meta.get("teacher_forward_passes", 0), "digest": meta.get("sha256")}
    continuations = {}
    for name in scenario.sites if causal.continuation_tokens else ():
        meta = ContinuationCache(run_dir / "sites" / name).metadata()
        continuations[name] = {"sequences": meta.get("sequences"), "new_tokens_total": meta.get("new_tokens_total"),
                               "bytes": meta.get("bytes"), "digest": meta.get("sha256"),
                               "teacher_generations": meta.get("teacher_generations", 0)}
    return {
        "task": "causal-lm",
        "headline_metric": "perplexity",
        "metrics": list(CAUSAL_METRICS),
        "lower_is_better": ["perplexity", "nll"],
        "model_labels": labels,
        "models": models,
        "comparison": comparison,
        "class_names": [],
        "sites": {name: {split: {"records": len(data), "tokens": int(data.inputs["attention_mask"].sum()),
                                 "persons": int(len(np.unique(data.groups)))}
                         for split, data in splits.items()} for name, splits in scenario.sites.items()},
        "size": {
            "measure": "parameters",
            "teacher": teacher_counts.to_dict(),
            "student": {**base_counts.to_dict(), "trainable": student_counts.trainable},
            "non_embedding_ratio": base_counts.non_embedding / teacher_counts.non_embedding,
            "student_parameters": base_counts.total,
            "student_file_bytes": _folder_bytes(exported / "model.safetensors"),
            "teacher_file_bytes": _folder_bytes(teacher_path),
            "file_note": "the student is float32 safetensors; a GGUF teacher file is quantized (Q4_K_M), so file "
                         "sizes compare formats as much as models",
            "latency_ms_per_token": {"teacher": teacher_latency, "student": student_latency,
                                     "speedup": teacher_latency / student_latency,
                                     "how": f"greedy generation of {LATENCY_NEW_TOKENS} tokens with the KV cache "
                                            f"from {LATENCY_PROMPTS} held-out {LATENCY_PROMPT_TOKENS}-token "
                                            "openings, batch 1, after a warm-up, float32 on this machine's CPU"},
        },
        "causal_lm": {
            "teacher": {"kind": scenario.teacher.kind, "source": teacher_path.name, "digest": scenario.teacher.digest,
                        "description": scenario.provenance.get("teacher")},
            "fragments": causal.fragments, "lora": causal.lora.to_dict() if causal.lora else None,
            "top_k": causal.top_k, "temperatures": list(causal.temperatures), "divergence": causal.divergence,
            "alignment": {"pairs": [list(p) for p in causal.alignment], "weight": causal.alignment_weight},
            "tail": "one extra outcome holding the teacher's probability mass outside its top k (docs/causal_lm.md)",
            "max_length": causal.max_length,
            "public_stage": student_record(Path(causal.base)).get("public_stage"),
            "vocabulary": _vocabulary_summary(coordinator.model, evaluation.tests),
            "cache": caches,
            "continuation_tokens": causal.continuation_tokens,
            "continuations": continuations,
            "sent_per_round": {name: _sent_per_round(run_dir / "sites" / name, run_id) for name in scenario.sites},
            "exported_student": str(exported),
        },
    }
