"""The coordinator's round logic as a plain object: plan, instruct, aggregate, evaluate, checkpoint, record.

The Flower ServerApp (:mod:`coordinator.app`) only moves messages; everything here is testable without Flower.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import time
from collections.abc import Callable, Sequence
from importlib.metadata import version
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.numpy import load_file
from torch import nn

from coordinator.aggregate import aggregate_fragments, check_aggregate
from protocols.sampling import sampling_active
from coordinator.replies import SiteReply, screen_replies
from coordinator.checkpoint import load_student, save_student
from coordinator.knowledge import distil_soft_labels, distil_token_soft_labels
from distill.causal_lm import base_provenance
from distill.losses import temperature_at
from distill.models import build_student, fragment_parameter_names, load_student_state, student_state
from protocols.canonical import atomic_write_bytes, canonical_json, digest_arrays
from protocols.config import FederationConfig
from protocols.curriculum import Stage, stage_of
from protocols.fragments import fragment_spec_for, planned_fragments
from protocols.knowledge import SOFT_LABELS, check_soft_labels, load_proxy
from protocols.errors import ConfigError, LedgerTampered, UpdateRejected
from protocols.evaluation import (SITE_EVALUATION_EVENT, EvaluationRelease, EvaluationRequest, metrics_of_histogram,
                                  pooled_metrics)
from protocols.governance import PARTIES_EVENT, PartiesDeclaration, parties_event
from protocols.ledger import Ledger, ledger_in, resumable_run
from protocols.messages import CoordinatorAnchor, LocalStageRequest, TrainInstruction, ValidationRequest
from protocols.secagg import decode_aggregate, site_weight

SCHEMA_VERSION = 1
log = logging.getLogger("fedistill.coordinator")
Evaluator = Callable[[nn.Module], dict[str, Any]]


class Coordinator:
    """Holds the global student of one run and advances it round by round."""

    def __init__(self, config: FederationConfig, run_id: str, run_dir: Path, evaluate: Evaluator | None = None,
                 on_round: Callable[[dict[str, Any]], None] | None = None, signing_key: Path | None = None,
                 transport: dict[str, Any] | None = None, coordinator_stage: dict[str, Any] | None = None,
                 initial_state: dict[str, np.ndarray] | None = None, proxy_path: Path | None = None,
                 parties: PartiesDeclaration | None = None) -> None:
        """``initial_state`` is the student the rounds start from: the one a coordinator stage produced
        (coordinator.curriculum), with ``coordinator_stage`` that stage's record, or the finished student of the run
        the config continues (``config.continues``, coordinator.continuation). Its digest must be the one named.
        ``proxy_path`` is a knowledge run's proxy set, checked against the digest the config registers. ``parties``
        is the operator's parties.toml, recorded in the ledger right after run-started (``parties-declared``)."""
        self.config, self.run_id, self.run_dir = config, run_id, Path(run_dir)
        self.proxy = None
        if config.knowledge is not None:
            if proxy_path is None:
                raise ConfigError("run config: field 'knowledge' names a proxy set, but the coordinator was given no "
                                  "proxy file; pass the file the sites were shipped.")
            self.proxy = load_proxy(Path(proxy_path), config.knowledge, "the coordinator")
        self.evaluate, self.on_round = evaluate, on_round
        self.config_hash = config.config_hash()
        torch.manual_seed(config.seed)
        self.family = config.student.family
        self.model = build_student(config.student)
        self.coordinator_stage = coordinator_stage
        continues = config.continues
        if (initial_state is None) != (coordinator_stage is None and continues is None):
            raise ValueError("a starting student comes with its coordinator stage's record or the run it continues")
        if coordinator_stage is not None and continues is not None:
            raise ConfigError("run config: a run continues an earlier run's student or starts from a coordinator "
                              "stage, not both.")
        if initial_state is None and stage_of(config.curriculum, "coordinator") is not None:
            raise ConfigError("run config: the curriculum names a coordinator stage, but no stage's student was "
                              "handed to the coordinator; a deployed run (fedistill run) has no public set or teacher "
                              "at the coordinator yet. Remove the coordinator stage from its curriculum.")
        if initial_state is not None:
            expected = continues.student_digest if continues is not None else coordinator_stage["student_digest"]
            if digest_arrays(initial_state) != expected:
                raise LedgerTampered("the starting student is not the one " + (
                    f"run {continues.run_id}'s ledger records as its final student" if continues is not None else
                    "the coordinator stage's record names") + " (digest mismatch); " + (
                    "start again from that run's student/ folder." if continues is not None else "run the stage again."))
            load_student_state(self.model, self.family, initial_state)
        self.state = student_state(self.model, self.family)
        # Round 0 of a run that keeps its best round: the student the rounds start from.
        self._start_state = dict(self.state)
        # Each validated round's pooled score (None: no site released one), and the best round's student.
        self.validation_scores: dict[int, float | None] = {}
        # The sites' test evaluations, by the schedule's round (protocols/evaluation.py): what the ledger signed.
        self.site_evaluations: dict[int, dict[str, Any]] = {}
        self.kept_round: int | None = None
        self.spec = fragment_spec_for(self.family, fragment_parameter_names(self.model, self.family),
                                      config.fragment_patterns)
        self._federated = stage_of(config.curriculum, "federated") or Stage("federated")
        self.spec.restricted_to(self._federated.fragments)  # an unknown fragment fails here, before any round
        local = stage_of(config.curriculum, "site-local")
        for fragments in ([local.fragments, *(f for _, f in local.site_fragments)] if local else []):
            self.spec.restricted_to(fragments)  # an unknown fragment, at any site, fails before any round
        self.site_local: dict[str, Any] | None = None
        self.records: list[dict[str, Any]] = []
        # Partial participation: which node each site answered from, and each pending round's sample.
        self.node_sites: dict[str, str] = {}
        self._sampling: dict[int, dict[str, Any]] = {}
        self.completed_round = 0
        self.signing_key, self.transport = signing_key, transport
        self.parties = parties
        self._ledger: Ledger | None = None
        # One instruction per round and process: its nonce binds the replies to this very request.
        self._instructions: dict[int, TrainInstruction] = {}

    @property
    def ledger(self) -> Ledger:
        """The run's ledger (``ledger.jsonl`` beside ``metrics.jsonl``), opened with a run-started event."""
        if self._ledger is None:
            self._ledger = ledger_in(self.run_dir, "coordinator", key_path=self.signing_key)
            if self._ledger.head[0] < 0:
                self._ledger.append("run-started", {"run_id": self.run_id, "config_hash": self.config_hash,
                                                    "config": self.config.to_dict(),
                                                    "code_version": version("fedistill")}
                                    | ({"transport": self.transport} if self.transport else {})
                                    | ({"student_base": base_provenance(self.config.student.causal_lm())}
                                       if self.family == "causal_lm" else {})
                                    | ({"coordinator_stage": self.coordinator_stage} if self.coordinator_stage else {}))
                if self.parties is not None:
                    # What only people know (legal entities, intended use, regimes), signed before the first round.
                    self._ledger.append(PARTIES_EVENT, parties_event(self.run_id, self.parties))
                # Signed at once, so that the first instruction already carries a checkpoint the sites record.
                self._ledger.checkpoint({"run_id": self.run_id, "after": "run-started"})
        return self._ledger

    @property
    def metrics_path(self) -> Path:
        return self.run_dir / "metrics.jsonl"

    @property
    def student_dir(self) -> Path:
        return self.run_dir / "student"

    def instruction(self, server_round: int) -> TrainInstruction:
        """What every site is asked in ``server_round``, with a fresh nonce and the latest signed ledger checkpoint."""
        if server_round not in self._instructions:
            self._instructions[server_round] = self._new_instruction(server_round)
        return self._instructions[server_round]

    def _anchor(self) -> CoordinatorAnchor:
        checkpoint = self.ledger.last_checkpoint
        assert checkpoint is not None, "the run ledger is checkpointed right after run-started"
        return CoordinatorAnchor(checkpoint["signed_seq"], checkpoint["signed_hash"], checkpoint["signature"],
                                 self.ledger.public_key_pem)

    def _new_instruction(self, server_round: int) -> TrainInstruction:
        c = self.config
        return TrainInstruction(
            server_round=server_round, total_rounds=c.rounds,
            fragments=planned_fragments(c.fragment_plan, self.spec.restricted_to(self._federated.fragments),
                                        server_round, c.rounds),
            temperature=temperature_at(server_round, c.rounds, c.temperature_schedule, c.temperature_start,
                                       c.temperature_end),
            alpha=c.alpha, local_steps=c.local_steps, batch_size=c.batch_size, optimizer=c.optimizer,
            learning_rate=c.learning_rate,
            hidden_alignment_weight=c.hidden_alignment_weight, seed=c.seed, run_id=self.run_id,
            config_hash=self.config_hash, student=c.student, target_epsilon=c.target_epsilon,
            target_delta=c.target_delta, max_grad_norm=c.max_grad_norm, grad_sample_mode=c.grad_sample_mode,
            privacy_unit=c.privacy_unit, evaluation_rounds=c.site_evaluation_rounds,
            secure_aggregation=c.secure_aggregation, clipping_range=c.clipping_range, weight_scale=c.weight_scale,
            max_update_norm=c.max_update_norm, nonce=secrets.token_hex(16), anchor=self._anchor(),
            training_records=self._federated.records, replay_min_entropy=self._federated.replay_min_entropy,
            knowledge=c.knowledge, preprocessing_digest=c.preprocessing_digest)

    def secure_payload(self, instruction: TrainInstruction) -> dict[str, np.ndarray]:
        """What each site puts into the SecAgg+ sum, by name, as the reference its values are differences from: the
        planned student tensors (unless only knowledge travels), then a knowledge run's soft labels (from zero)."""
        knowledge = self.config.knowledge
        names = [] if knowledge is not None and not knowledge.sends_weights else self.spec.parameters_of_all(
            instruction.fragments)
        payload = {name: self.state[name] for name in names}
        if knowledge is not None:
            payload[SOFT_LABELS] = np.zeros(knowledge.soft_label_shape, dtype=np.float64)
        return payload

    @property
    def reported_ledger_seqs(self) -> dict[str, int]:
        """The latest ledger head each site reported with an accepted update: its next one must be later."""
        seqs: dict[str, int] = {}
        for record in self.records:
            for site, report in record.get("privacy", {}).items():
                seqs[site] = max(seqs.get(site, -1), int(report["ledger-seq"]))
        return seqs

    def complete_round(self, server_round: int, replies: Sequence[SiteReply], failures: dict[str, str],
                       started: float, refusals: dict[str, str] | None = None, rejected: dict[str, str] | None = None,
                       expected_sites: dict[str, str] | None = None) -> dict[str, Any]:
        """Plain aggregation: screen every reply, average the accepted ones, check the aggregate, then apply it.

        ``rejected`` holds replies the transport could not even decode; ``expected_sites`` maps each source (node)
        to the site it answered as in this round's query.
        """
        instruction = self.instruction(server_round)
        screened = screen_replies(replies, instruction, self.state, self.spec, self.reported_ledger_seqs,
                                  expected_sites)
        result = aggregate_fragments(self.state, self.spec, instruction.fragments, screened.accepted, server_round,
                                     self.config.max_update_norm, self.config.weight_scale)
        accepted = [r for r in screened.accepted if r.site in result.accepted]
        weights = np.array([site_weight(r.num_examples, self.config.weight_scale) for r in accepted], dtype=np.float64)
        loss = float(np.dot(weights, [r.train_loss for r in accepted]) / weights.sum()) if accepted else None
        return self._apply(server_round, result.state if accepted else None, sorted(result.accepted), loss,
                           {"aggregation": "plain", "rejected": (rejected or {}) | screened.rejected,
                            "aggregate_rejected": result.aggregate_rejected, "failures": failures,
                            "refusals": refusals or {}, "privacy": {r.site: r.privacy for r in accepted}}, started)

    def complete_secure_round(self, server_round: int, vectors: Sequence[np.ndarray] | None, participants: list[str],
                              privacy: dict[str, dict[str, Any]], failures: dict[str, str], refusals: dict[str, str],
                              started: float, rejected: dict[str, str] | None = None,
                              halted: str | None = None) -> dict[str, Any]:
        """SecAgg+: only the mean of the sites' masked vectors arrives; it is decoded and validated, then applied.

        ``privacy`` holds the screened clear metadata of the sites whose vectors were summed (coordinator.replies);
        ``rejected`` the sites dropped from the sum before unmasking. ``vectors`` is None when the protocol did not
        complete (``halted`` says why): the round is recorded as failed.
        """
        instruction = self.instruction(server_round)
        details: dict[str, Any] = {"aggregation": "secagg+", "rejected": rejected or {}, "aggregate_rejected": None,
                                   "failures": failures, "refusals": refusals, "privacy": privacy}
        if vectors is None:
            details["aggregate_rejected"] = (f"round {server_round}: " + (halted or (
                "SecAgg+ halted (fewer live sites than the reconstruction threshold)")) + "; nothing was aggregated")
            log.error("%s; the global student is unchanged.", details["aggregate_rejected"])
            return self._apply(server_round, None, [], None, details, started)
        if len(participants) < self.config.min_cohort:
            # Drop-outs and rejections can leave fewer vectors in the sum than the cohort a site's privacy relies on.
            details["aggregate_rejected"] = (f"round {server_round}: only {len(participants)} site(s)' vectors were "
                                             f"summed, fewer than min_cohort={self.config.min_cohort}; the sum is "
                                             "not used")
            log.error("%s; the global student is unchanged.", details["aggregate_rejected"])
            return self._apply(server_round, None, [], None, details, started)
        payload = self.secure_payload(instruction)
        try:
            decoded = decode_aggregate(vectors, list(payload), payload, self.config.secagg_settings(), server_round)
            weights = {name: value for name, value in decoded.state.items() if name != SOFT_LABELS}
            if weights:
                check_aggregate(weights, self.state, self.spec, instruction.fragments, server_round,
                                self.config.max_update_norm)
            new_state = self.state | weights
            if self.config.knowledge is not None:
                new_state, details["knowledge"] = self._distil_knowledge(server_round, new_state,
                                                                         decoded.state[SOFT_LABELS])
        except Exception as err:  # an aggregate of any shape or content fails the round, never the run
            log.error("%s The global student is unchanged.", err)
            details["aggregate_rejected"] = str(err) if isinstance(err, UpdateRejected) else (
                f"round {server_round}: the secure aggregate could not be decoded ({type(err).__name__}: {err})")
            load_student_state(self.model, self.family, self.state)
            return self._apply(server_round, None, [], None, details, started)
        details["quantization_error_bound"] = decoded.error_bound
        return self._apply(server_round, new_state, sorted(participants), decoded.train_loss, details, started)

    def _distil_knowledge(self, server_round: int, state: dict[str, np.ndarray], soft_labels: np.ndarray
                          ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """The sites' mean soft labels (checked) distilled into ``state`` on the proxy inputs: (new state, record)."""
        knowledge = self.config.knowledge
        assert knowledge is not None and self.proxy is not None
        mean = check_soft_labels(soft_labels, knowledge, f"round {server_round}: the secure mean of the soft labels")
        load_student_state(self.model, self.family, state)
        seed = self.config.seed * 100_003 + server_round
        if knowledge.token_level:
            spec = self.config.student.causal_lm()
            record = distil_token_soft_labels(self.model, self.proxy, mean, knowledge,
                                              self.spec.parameters_of_all(self.instruction(server_round).fragments),
                                              spec.divergence, spec.beta, seed)
        else:
            record = distil_soft_labels(self.model, self.family, self.proxy, mean, knowledge, seed)
        distilled = student_state(self.model, self.family)
        if not all(np.all(np.isfinite(value)) for value in distilled.values()):
            raise UpdateRejected(f"round {server_round}: server-side distillation on the soft labels left non-finite "
                                 "weights; lower the knowledge 'server_learning_rate'.")
        return distilled, record

    def _apply(self, server_round: int, new_state: dict[str, np.ndarray] | None, participants: list[str],
               train_loss: float | None, details: dict[str, Any], started: float) -> dict[str, Any]:
        instruction = self.instruction(server_round)
        if new_state is not None:
            self.state = new_state
            load_student_state(self.model, self.family, self.state)
        record: dict[str, Any] = {
            "schema_version": SCHEMA_VERSION,
            "round": server_round,
            "fragments": list(instruction.fragments),
            "temperature": instruction.temperature,
            "participants": participants,
            **details,
            "status": "aggregated" if new_state is not None else "failed",
            "train_loss": train_loss,
            "student_digest": digest_arrays(self.state),
        }
        if self.evaluate is not None:
            record["evaluation"] = self.evaluate(self.model)
        return self._finish(record, started)

    def stop(self, server_round: int, refusals: dict[str, str], failures: dict[str, str], started: float,
             rejected: dict[str, str] | None = None) -> dict[str, Any]:
        """Too few sites accepted the round: nothing trains, the student stays as it is, and the run ends here."""
        record: dict[str, Any] = {
            "schema_version": SCHEMA_VERSION, "round": server_round, "status": "stopped",
            "reason": (f"fewer than {self.config.fewest_sites_per_round} site(s) accepted round {server_round} "
                       f"(min_sites={self.config.min_sites}"
                       + (f", SecAgg+ min_cohort={self.config.min_cohort})" if self.config.secure_aggregation
                          else ")")),
            "participants": [], "rejected": rejected or {}, "failures": failures, "refusals": refusals,
            "privacy": {}, "student_digest": digest_arrays(self.state)}
        return self._finish(record, started)

    def note_sampling(self, server_round: int, connected: list[int], not_asked: list[int]) -> None:
        """Partial participation (protocols/sampling.py): the connected nodes and those this round did not ask,
        kept in the round's record (by site where the node has answered before, else by node)."""
        self._sampling[server_round] = {"connected": [f"node-{n}" for n in sorted(connected)],
                                        "not_sampled": [self.site_of(f"node-{n}") for n in sorted(not_asked)]}

    def learn_sites(self, sources: dict[str, str]) -> None:
        """Which site answered from which node (screened answers only), for the records of sites not asked."""
        self.node_sites |= sources

    def site_of(self, source: str) -> str:
        return self.node_sites.get(source, source)

    def took_part(self, connected: list[int]) -> list[int]:
        """The connected nodes a post-round stage (validation, test evaluation, site-local) asks: with partial
        participation, only those that answered a round of this run, since a site never sampled never accepted the
        run and acts for no run it did not accept; otherwise every connected node."""
        if not sampling_active(self.config):
            return connected
        return [n for n in connected if f"node-{n}" in self.node_sites]

    def _finish(self, record: dict[str, Any], started: float) -> dict[str, Any]:
        if record["round"] in self._sampling:
            record["sampling"] = self._sampling.pop(record["round"])
        record["seconds"] = round(time.perf_counter() - started, 3)
        # Each round's signed checkpoint records the head of every participating site's own ledger, so that
        # neither the coordinator nor a site can rewrite its history alone.
        site_heads = {site: [report["ledger-seq"], report["ledger-hash"]]
                      for site, report in record.get("privacy", {}).items() if "ledger-hash" in report}
        self.ledger.append("round", {key: value for key, value in record.items() if key != "evaluation"}
                           | {"evaluation": record.get("evaluation", {}).get("overall")})
        self.ledger.checkpoint({"round": record["round"], "site_heads": site_heads,
                                "student_digest": record["student_digest"]})
        self._append_metrics(record)
        # The student is checkpointed after the round is on record: a crash in between leaves the previous
        # round's student, whose digest the ledger holds, so a resumed run redoes this round (see resume). A
        # stopped round trained nothing; the checkpoint stays that of the last round that did, and a resumed
        # run asks the sites again.
        if record["status"] != "stopped":
            save_student(self.model, self.config.student, self.student_dir, self.config,
                         {"run_id": self.run_id, "round": record["round"], "student_digest": record["student_digest"]})
        self.completed_round = record["round"]
        self.records.append(record)
        if self.on_round is not None:
            self.on_round(record)
        return record

    @property
    def keeps_best(self) -> bool:
        return self._federated.keep_best

    @property
    def best_path(self) -> Path:
        """The best validated round's student so far (a run that keeps its best round), for a resumed run."""
        return self.run_dir / "best" / "model.safetensors"

    def validation_requests(self, server_round: int) -> list[tuple[ValidationRequest, dict[str, np.ndarray]]]:
        """What to ask the sites after ``server_round`` (after round 1, the starting student too, as round 0: the
        sites accept a run on its first round, and score only students of runs they accepted)."""
        students = ([(0, self._start_state)] if server_round == 1 else []) + [(server_round, self.state)]
        return [(ValidationRequest(self.run_id, self.config_hash, self.config.student, round_, digest_arrays(state),
                                   secrets.token_hex(16)), state) for round_, state in students]

    def record_validation(self, request: ValidationRequest, state: dict[str, np.ndarray],
                          reports: dict[str, dict[str, Any]], failures: dict[str, str],
                          rejected: dict[str, str]) -> dict[str, Any]:
        """Sign what each site released of its validation score of one round's student, with the pooled score (the
        mean ROC-AUC weighted by validation records, over the sites that released one); keep the best student."""
        released = [r for r in reports.values() if r.get("released") and r.get("roc_auc") is not None and r["n"] > 0]
        score = (float(sum(r["roc_auc"] * r["n"] for r in released) / sum(r["n"] for r in released))
                 if released else None)
        payload = {"run_id": self.run_id, "config_hash": self.config_hash, "round": request.round,
                   "student_digest": request.student_digest, "sites": reports, "failures": failures,
                   "rejected": rejected, "score": score}
        self.ledger.append("validation", payload)
        self.ledger.checkpoint({"run_id": self.run_id, "after": f"validation of round {request.round}"})
        best = best_validated_round(self.validation_scores)
        self.validation_scores[request.round] = score
        if score is not None and (best is None or score > self.validation_scores[best]):
            atomic_write_bytes(self.best_path, safetensors_bytes(state))
        return payload

    def evaluation_request(self, server_round: int | None = None) -> EvaluationRequest | None:
        """The sites' test evaluation of the current student after ``server_round``, when the schedule has that
        round and it is not evaluated yet. Without a round: the schedule's last slot, for the student a run ends
        with (one that stopped before its last round still gets its final student evaluated once)."""
        schedule = self.config.site_evaluation_rounds
        slot = server_round if server_round is not None else (schedule[-1] if schedule else None)
        if slot is None or slot not in schedule or slot in self.site_evaluations:
            return None
        classes = (int(self.config.student.settings["num_classes"]) if self.family == "mlp"
                   else int(self.model.config.num_labels))
        return EvaluationRequest(self.run_id, self.config_hash, self.config.student, slot, digest_arrays(self.state),
                                 classes, self.config.evaluation_bins, secrets.token_hex(16))

    def record_site_evaluation(self, request: EvaluationRequest, releases: dict[str, EvaluationRelease],
                               failures: dict[str, str], rejected: dict[str, str]) -> dict[str, Any]:
        """Sign what each site released of its test evaluation, each site's metrics from it and the pooled metrics
        of their summed histograms (noise included: the figures a deployed consortium gets)."""
        payload = {"run_id": self.run_id, "config_hash": self.config_hash, "round": request.round,
                   "after_round": self.completed_round, "student_digest": request.student_digest,
                   "classes": request.classes, "bins": request.bins,
                   "sites": {site: {**release.to_dict(), "metrics": None if release.histogram is None
                                    else metrics_of_histogram(release.histogram)}
                             for site, release in sorted(releases.items())},
                   "pooled": pooled_metrics(list(releases.values())), "failures": failures, "rejected": rejected}
        self.ledger.append(SITE_EVALUATION_EVENT, payload)
        self.ledger.checkpoint({"run_id": self.run_id, "after": f"site evaluation of round {request.round}"})
        self.site_evaluations[request.round] = payload
        log.info("run %s: the sites' test evaluation after round %d (%d released): %s", self.run_id,
                 self.completed_round, payload["pooled"]["sites"],
                 {k: v for k, v in payload["pooled"].items() if k in ("roc_auc", "accuracy")})
        return payload

    def keep_best_round(self) -> int | None:
        """A run that keeps its best round ends with that round's student (by validated score; the last round's
        when no site released a score). Returns the kept round, or None for a run that keeps the last round."""
        if not self.keeps_best:
            return None
        best = best_validated_round(self.validation_scores)
        self.kept_round = self.completed_round if best is None else best
        if best is not None and best != self.completed_round:
            state = load_file(str(self.best_path))
            self.state = state
            load_student_state(self.model, self.family, state)
            save_student(self.model, self.config.student, self.student_dir, self.config,
                         {"run_id": self.run_id, "round": best, "kept_round": best,
                          "student_digest": digest_arrays(state)})
        log.info("run %s keeps the student of round %d (validation score %s)", self.run_id, self.kept_round,
                 self.validation_scores.get(self.kept_round))
        return self.kept_round

    def site_local_request(self) -> LocalStageRequest | None:
        """The site-local stage's request for the final student, when the curriculum has that stage."""
        stage = stage_of(self.config.curriculum, "site-local")
        if stage is None or (self.records and self.records[-1]["status"] == "stopped"):
            return None
        return LocalStageRequest(self.run_id, self.config_hash, self.config.student, stage, digest_arrays(self.state),
                                 self.completed_round, self.config.seed, secrets.token_hex(16))

    def record_site_local(self, request: LocalStageRequest, reports: dict[str, dict[str, Any]],
                          failures: dict[str, str], rejected: dict[str, str]) -> dict[str, Any]:
        """What each site released of its site-local stage (its metrics, or that they are withheld), signed."""
        payload = {"run_id": self.run_id, "config_hash": self.config_hash, "stage": request.stage.to_dict(),
                   "started_from": request.student_digest, "final_round": request.final_round,
                   "sites": reports, "failures": failures, "rejected": rejected}
        self.ledger.append("site-local-stage", payload)
        self.ledger.checkpoint({"run_id": self.run_id, "after": "site-local-stage"})
        self.site_local = payload
        return payload

    def finish(self) -> dict[str, Any]:
        """The run's last, signed event: which rounds it recorded, the final one, and the student it leaves.

        ``fedistill verify`` requires it: a run without it verifies as incomplete. The digest is that of the last
        recorded round (a stopped round leaves the student as it was), and of what ``student/`` must hold.
        """
        payload = {"run_id": self.run_id, "config_hash": self.config_hash, "final_round": self.completed_round,
                   "rounds": [r["round"] for r in self.records],
                   **({"sites_by_node": dict(sorted(self.node_sites.items()))} if sampling_active(self.config)
                      else {}),
                   "ended": "stopped" if self.records and self.records[-1]["status"] == "stopped" else "completed",
                   "student_digest": digest_arrays(self.state)} | (
                       {"kept_round": self.kept_round} if self.kept_round is not None else {})
        event = self.ledger.append("run-finished", payload)
        self.ledger.checkpoint({"run_id": self.run_id, "after": "run-finished"})
        log.info("run %s finished after round %d", self.run_id, self.completed_round)
        return event

    def _append_metrics(self, record: dict[str, Any]) -> None:
        self.metrics_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.metrics_path, "a", encoding="utf-8") as handle:
            handle.write(canonical_json(record) + "\n")
            handle.flush()
            os.fsync(handle.fileno())

    def resume(self) -> int:
        """Continue this run after a coordinator crash; returns the last round whose student is kept.

        The checkpointed student is taken only if the run ledger recorded a round with exactly its digest.
        Rounds the ledger holds beyond it (a crash between the record and the checkpoint) are redone; the
        ledger keeps them, and a ``run-resumed`` event says which were superseded.
        """
        events = resumable_run(self.run_dir / "ledger.jsonl", self.run_id, self.config_hash)
        recorded = {e["payload"]["round"]: e["payload"] for e in events if e["kind"] == "round"}
        kept = 0
        directory = next((d for d in (self.student_dir, self.student_dir.with_name(f".{self.student_dir.name}.old"))
                          if (d / "checkpoint.json").is_file()), None)
        if directory is not None:
            model, manifest = load_student(directory)
            state = student_state(model, self.family)
            round_ = int(manifest["round"])
            if recorded.get(round_, {}).get("student_digest") != digest_arrays(state):
                raise LedgerTampered(f"cannot resume run {self.run_id}: the checkpointed student of round {round_} "
                                     "is not the one the run ledger recorded for that round.")
            self.model, self.state, kept = model, state, round_
        recorded_parties = [e["payload"]["digest"] for e in events if e["kind"] == PARTIES_EVENT]
        if self.parties is not None and recorded_parties != [self.parties.digest]:
            raise ConfigError(f"cannot resume run {self.run_id}: its parties declaration is not the one the run "
                              "ledger recorded when it started; resume with the parties.toml the run started with.")
        superseded = sorted(r for r in recorded if r > kept)
        self.ledger.append("run-resumed", {"run_id": self.run_id, "config_hash": self.config_hash,
                                           "from_round": kept + 1, "superseded_rounds": superseded}
                           | ({"transport": self.transport} if self.transport else {}))
        self.records = [r for r in load_metrics(self.run_dir) if r["round"] <= kept] if self.metrics_path.is_file() else []
        atomic_write_bytes(self.metrics_path, "".join(canonical_json(r) + "\n" for r in self.records).encode())
        self.completed_round = kept
        self.validation_scores = {e["payload"]["round"]: e["payload"]["score"] for e in events
                                  if e["kind"] == "validation" and e["payload"]["round"] <= kept}
        self.site_evaluations = {e["payload"]["round"]: e["payload"] for e in events
                                 if e["kind"] == SITE_EVALUATION_EVENT and e["payload"]["after_round"] <= kept}
        log.info("run %s resumes after round %d%s", self.run_id, kept,
                 f"; round(s) {superseded} are redone" if superseded else "")
        return kept


def best_validated_round(scores: dict[int, float | None]) -> int | None:
    """The round with the best pooled validation score; the earliest on a tie; None when none was scored."""
    scored = [(score, -round_) for round_, score in scores.items() if score is not None]
    return -max(scored)[1] if scored else None


def safetensors_bytes(state: dict[str, np.ndarray]) -> bytes:
    from safetensors.numpy import save

    return save({name: np.ascontiguousarray(value) for name, value in state.items()})


def load_metrics(run_dir: Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
