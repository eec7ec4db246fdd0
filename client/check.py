"""``fedistill site check``: everything that must be right before a site joins, as a checklist.

Each check runs on its own, so one failure does not hide the next; checks that need an earlier result
(the teacher needs the records) are skipped, and say so, when it failed.

A text (causal-LM) site is checked the same way with its own items: the data check tokenizes the documents
with the teacher's tokenizer (so the teacher is loaded first), the teacher check reports its kind, vocabulary
and digest and runs it on a few documents, and a "student base" check finds the run's base student folder
and prints its digest, for the site to compare with the run's ``base_digest``. Texts are never shown.

A site with the run's preprocessor (``[data] preprocessor``: a raw table) has a "preprocessing" item (the file's
SHA-256, to compare with the run's ``preprocessing_digest``, its raw columns, features and classes); its data check
reads the raw table through it, naming a missing column, an unparsable number or a category the public data never
had; its teacher check names a teacher that reads another number of features than the preprocessor gives. With the
run's config (``--run-config``, from the operator), a "run config" item compares the run's student's input width and
classes and its ``preprocessing_digest`` with this site's.
"""

from __future__ import annotations

import json
import os
import socket
import ssl
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from client.records import MIN_TOKENS, TextData, load_documents, tokenize_documents
from client.preprocessing import preprocessing_mismatch
from client.registration import CoordinatorUnreachable, node_key_registered
from client.sitefile import SiteFile, check_student_base, held_out_by_person
from client.teacher import check_teacher_for_run
from distill.data import SplitData
from distill.models import SklearnTeacher, Teacher, load_teacher, path_digest
from protocols.accounting import PrivacyState
from protocols.canonical import file_sha256
from protocols.config import FederationConfig
from protocols.errors import ConfigError, FedistillError, UpdateRejected
from protocols.pki import EXPIRY_WARNING_DAYS, check_certificate, node_key_fingerprint

TEACHER_SAMPLE = 64
# Documents a causal-LM teacher is run on: its logits are [documents, max_length, vocabulary] floats (262,144 wide
# for Gemma), so a few are enough to show it runs and reads the tokenizer's ids.
TEXT_TEACHER_SAMPLE = 4
STUDENT_BASE = "student base"
PREPROCESSING = "preprocessing"
RUN_CONFIG = "run config"
CONNECT_TIMEOUT_S = 5.0
REGISTRATION = "node key registered"


@dataclass(frozen=True)
class CheckItem:
    name: str
    ok: bool | None  # None: not checked (a check it depends on failed, --offline, coordinator unreachable)
    detail: str


def _records(site: SiteFile) -> tuple[str, SplitData]:
    records = site.records()
    counts = np.bincount(records.labels, minlength=len(site.schema.classes))
    per_class = ", ".join(f"{name} {count}" for name, count in zip(site.schema.classes, counts))
    empty = [name for name, count in zip(site.schema.classes, counts) if count == 0]
    note = f"; no record of class {', '.join(empty)}" if empty else ""
    features = (f"{len(site.schema.features)} raw column(s) made into {records.inputs['x'].shape[1]} feature(s) by "
                "the run's preprocessing" if site.preprocessor is not None
                else f"{len(site.schema.features)} feature(s)")
    return (f"{len(records)} records, {features}, label '{site.schema.label}' "
            f"({per_class}){note}; at most {records.max_records_per_person()} record(s) per person"
            + ("" if site.schema.person_id else "; no [data] person_id: each record is its own unit of privacy")
            + _held_out(records, site.test_share)), records


def _held_out(records: SplitData, share: float) -> str:
    if share <= 0:
        return "; no test split ([data] test_share = 0): this site evaluates no run's student"
    test = held_out_by_person(records, share)["test"]
    return f"; {len(test)} record(s) held out as the test split (test_share {share:g}), never trained on"


def _preprocessing(site: SiteFile) -> str:
    """The run's preprocessor as this site has it: the digest to compare with the run's, what it reads and gives."""
    preprocessor = site.preprocessor
    assert preprocessor is not None and site.preprocessor_path is not None
    spec = preprocessor.spec
    columns = ", ".join(f"{c.name} ({c.kind}" + (f": {', '.join(preprocessor.categories[c.name])})"
                                                 if c.kind == "categorical" else ")") for c in spec.columns)
    return (f"{site.preprocessor_path}: skops, SHA-256 {file_sha256(site.preprocessor_path)}; compare it with the "
            "run's preprocessing_digest (from the operator): a run pinning another cannot train here. It reads "
            f"{columns}; gives the teacher {preprocessor.input_dim} features ({', '.join(preprocessor.feature_names)}); "
            f"label '{spec.label}', classes {', '.join(spec.classes)} in the teacher's logit order")


def _teacher_width(teacher: Teacher) -> int | None:
    """How many features the teacher reads, where it says so (a fitted scikit-learn estimator's n_features_in_)."""
    width = getattr(teacher.estimator, "n_features_in_", None) if isinstance(teacher, SklearnTeacher) else None
    return None if width is None else int(width)


def _teacher(site: SiteFile, records: SplitData) -> str:
    teacher = load_teacher(site.teacher_path)
    features = records.inputs["x"].shape[1]
    given = "the preprocessor gives" if site.preprocessor is not None else "[data] features lists"
    width = _teacher_width(teacher)
    if width is not None and width != features:
        fix = ("the teacher was not fitted on this run's preprocessing; use the teacher fitted on its features"
               if site.preprocessor is not None else "list the teacher's input columns, in the order it reads them")
        raise FedistillError(f"{given} {features} features but the teacher reads {width} (teacher "
                             f"'{site.teacher_path}'): {fix}.")
    sample = records.subset(np.arange(min(TEACHER_SAMPLE, len(records))))
    try:
        logits = np.asarray(teacher.logits(sample.inputs))
    except (ValueError, RuntimeError) as err:  # a model that reads another width says so in its own words
        raise FedistillError(f"teacher '{site.teacher_path}' cannot read this site's {features} features "
                             f"({type(err).__name__}: {err}); {given} {features}.") from None
    expected = (len(sample), len(site.schema.classes))
    if logits.shape != expected:
        classes = ("the run's preprocessing names" if site.preprocessor is not None else "[data] classes names")
        raise FedistillError(f"teacher '{site.teacher_path}' gave logits of shape {logits.shape} on {len(sample)} "
                             f"records; expected {expected}: the teacher gives {logits.shape[-1]} logits but "
                             f"{classes} {len(site.schema.classes)} classes ({', '.join(site.schema.classes)}, in the "
                             "teacher's logit order).")
    if not np.isfinite(logits).all():
        raise FedistillError(f"teacher '{site.teacher_path}' gave non-finite logits.")
    agreement = float((logits.argmax(1) == sample.labels).mean())
    detail = (f"{teacher.kind} loads; logits {logits.shape[1]} classes; agrees with the labels on {agreement:.0%} of "
              "a sample")
    declared, usable = _declaration(site)
    if not usable:
        raise FedistillError(f"{detail}\n{declared}")
    return f"{detail}\n{declared}"


def _documents(site: SiteFile, teacher: Any | None) -> tuple[str, TextData | None]:
    """A text site's table; with the teacher's tokenizer, its splits' documents and tokens (counts, never text)."""
    schema = site.schema
    documents = load_documents(site.data_path, schema)
    read = f"{len(documents.texts)} documents in text column '{schema.text}'"
    if teacher is None:
        return f"{read}; tokens not counted: the teacher did not load (its tokenizer splits the documents)", None
    text = tokenize_documents(site.data_path, documents, schema, teacher.tokenizer, site.max_records_per_person)
    empty = f", {documents.missing} of them empty" if documents.missing else ""
    names = {"train": "train", "val": "validation", "test": "test"}
    splits = ", ".join(f"{names[name]} {len(split)} documents / {text.tokens(name)} tokens"
                       for name, split in text.splits.items())
    order = f"split in order of '{schema.order_by}', oldest first" if schema.order_by else "split in file order"
    if text.persons is None:
        persons = "no [data] person_id: each document is its own unit of privacy"
    else:
        persons = (f"{text.persons} person(s), at most {text.splits['train'].max_records_per_person()} training "
                   "document(s) per person")
        if text.limited:
            persons += f" ({text.limited} left out by [data] max_records_per_person)"
    return (f"{read}; {text.dropped} dropped (fewer than {MIN_TOKENS} tokens{empty}); {order}: {splits}; "
            f"{text.at_max_length()} reach max_length {schema.max_length} (longer ones are cut); {persons}"), text


def _causal_teacher(site: SiteFile, teacher: Any, text: TextData | None) -> str:
    """A causal-LM teacher: its kind, vocabulary and digest, and a forward pass on a few training documents."""
    import torch

    from distill.causal_train import causal_logits

    tokens, rows = len(teacher.tokenizer), teacher.model.get_input_embeddings().num_embeddings
    detail = (f"{teacher.kind} loads (digest {teacher.digest}); its tokenizer's {tokens} tokens fit the embedding's "
              f"{rows} rows")
    if text is None:
        detail += "; not run: the data check failed"
    else:
        train = text.splits["train"]
        sample = train.subset(np.arange(min(TEXT_TEACHER_SAMPLE, len(train))))
        ids, mask = (torch.from_numpy(sample.inputs[key]) for key in ("input_ids", "attention_mask"))
        with torch.no_grad():
            logits = causal_logits(teacher.model, ids, mask)
        if logits.shape[:2] != ids.shape or not torch.isfinite(logits).all():
            raise FedistillError(f"teacher '{site.teacher_path}' gave logits of shape {tuple(logits.shape)} (finite: "
                                 f"{bool(torch.isfinite(logits).all())}) on {len(sample)} documents of "
                                 f"{ids.shape[1]} tokens; expected finite [documents, tokens, vocabulary] logits.")
        real = mask[:, 1:] == 1
        agreement = float((logits[:, :-1].argmax(-1) == ids[:, 1:])[real].float().mean()) if real.any() else 0.0
        detail += (f"; logits over {logits.shape[-1]} tokens; predicts the next token at {agreement:.0%} of the "
                   f"positions of {len(sample)} training documents")
    declared, usable = _declaration(site)
    if not usable:
        raise FedistillError(f"{detail}\n{declared}")
    return f"{detail}\n{declared}"


def _student_base(site: SiteFile) -> str:
    model_type = check_student_base(site.student_base)
    return (f"{site.student_base}: {model_type}, digest {path_digest(site.student_base)}; compare it with the "
            "base_digest of the run's student (from the operator): a run pinning another digest cannot train here")


def _proxy_set(site: SiteFile) -> str:
    """A knowledge run's proxy set ([knowledge] proxy_set): readable, its records and the digest to compare."""
    from safetensors.numpy import load_file

    path = site.proxy_set
    if path is None or not path.is_file():
        raise FedistillError(f"[knowledge] proxy_set '{path}' is not a file; copy the proxy set the consortium "
                             "operator shipped there, or remove the [knowledge] table.")
    try:
        sizes = sorted({len(values) for values in load_file(str(path)).values()})
    except Exception as err:  # safetensors raises its own error types for a malformed file
        raise FedistillError(f"[knowledge] proxy_set '{path}' is not a safetensors file ({err}).") from None
    return (f"{path}: {', '.join(map(str, sizes))} record(s), SHA-256 {file_sha256(path)}; compare it with the "
            "proxy_digest of the run's knowledge settings (from the operator): a run registering another cannot "
            "train here")


def load_run_config(path: Path) -> FederationConfig:
    """The run's federation config as the operator ships it: the run directory's config.json (its ``federation``
    object), or that object alone."""
    where = f"--run-config '{path}'"
    try:
        raw = json.loads(Path(path).read_text())
    except OSError as err:
        raise ConfigError(f"{where} cannot be read ({err.strerror}); ask the operator for the run's config.json.") \
            from None
    except ValueError as err:
        raise ConfigError(f"{where} is not JSON ({err}); it must be the run's config.json.") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{where} must hold a JSON object (the run's config.json), got {type(raw).__name__}.")
    return FederationConfig.from_dict(raw["federation"] if "federation" in raw else raw, where)


def _run_config(site: SiteFile, path: Path) -> str:
    """The run's student and preprocessing against this site's features, classes and preprocessor: every mismatch
    named (each would have the site refused, or train a student on inputs it does not read)."""
    config = load_run_config(path)
    student, problems, agreed = config.student, [], []
    if not site.text_site:
        features = (site.preprocessor.input_dim if site.preprocessor is not None else len(site.schema.features))
        given = "the preprocessor gives" if site.preprocessor is not None else "[data] features lists"
        classes = len(site.schema.classes)
        width = student.settings.get("input_dim")
        if width is not None:
            (agreed if width == features else problems).append(
                f"the run's student reads input_dim {width} features, {given} {features}")
        outputs = student.settings.get("num_classes", student.settings.get("num_labels"))
        if outputs is not None:
            (agreed if outputs == classes else problems).append(
                f"the run's student has {outputs} classes, this site {classes} ({', '.join(site.schema.classes)})")
    site_digest = file_sha256(site.preprocessor_path) if site.preprocessor_path is not None else None
    mismatch = preprocessing_mismatch(site_digest, config.preprocessing_digest)
    if mismatch is None:
        agreed.append("no preprocessing pinned or used" if site_digest is None
                      else f"preprocessing_digest {site_digest} is this site's preprocessor's")
    else:
        problems.append(mismatch)
    run = f"run config {path} (config hash {config.config_hash()[:12]}, student {student.family})"
    if problems:
        raise FedistillError(f"{run}: " + "; ".join(problems) + ".")
    return f"{run}: " + "; ".join(agreed)


def _declaration(site: SiteFile) -> tuple[str, bool]:
    """The line on what the teacher was trained on, and whether a DP run would accept it (client/teacher.py)."""
    declaration = site.teacher_declaration
    described = f" ({declaration.description})" if declaration.description else ""
    line = f"declared training data: {declaration.training_data}{described}"
    try:
        check_teacher_for_run(declaration, private_run=True, site_name=site.name, teacher_digest="")
    except UpdateRejected:
        return (f"{line}: trained on private records without DP and not acknowledged, so this site will refuse "
                "every differentially private run. Train the teacher with DP (training_data = \"private-dp\"), use "
                "a public teacher (training_data = \"public\"), or set [teacher] acknowledge_non_dp = true, knowing "
                "the report will mark this site's record-level guarantee as void."), False
    if declaration.training_data == "private":
        return (f"{line}: trained on private records without DP, acknowledged ([teacher] acknowledge_non_dp); "
                "the report marks this site's record-level guarantee as void"), True
    return line, True


def _budget(site: SiteFile) -> str:
    policy = site.policy
    state = PrivacyState.load(site.state_dir)
    deltas = [c.delta for c in state.calibrations.values()]
    delta = min(deltas) if deltas else (policy.delta if policy.delta is not None else 1e-5)
    spent = state.epsilon(delta, policy.accountant) if state.spends else 0.0
    caps = (f"per run {policy.epsilon_per_run:g}" if policy.epsilon_per_run is not None else "no per-run cap") + ", " + (
        f"lifetime {policy.epsilon_lifetime:g}" if policy.epsilon_lifetime is not None else "no lifetime cap")
    if policy.epsilon_lifetime is not None and spent >= policy.epsilon_lifetime:
        raise FedistillError(f"lifetime budget spent: epsilon {spent:.3f} of {policy.epsilon_lifetime:g}; this site "
                             "would refuse every private round. Raise [privacy] epsilon_lifetime only with your "
                             "privacy officer's approval.")
    left = "unbounded" if policy.epsilon_lifetime is None else f"{policy.epsilon_lifetime - spent:.3f}"
    counts = {mechanism: sum(spend.mechanism == mechanism for spend in state.spends)
              for mechanism in ("dp-sgd", "pate", "evaluation")}
    events = f"{counts['dp-sgd']} round(s)" + "".join(
        f" and {counts[m]} {label}(s)" for m, label in (("pate", "PATE release"), ("evaluation", "noised test evaluation"))
        if counts[m])
    release = (f"test metrics {policy.test_metrics}" + (f" (noise std {policy.evaluation_noise_multiplier:g}, charged)"
                                                        if policy.test_metrics == "noised" else ""))
    return f"{caps}; spent {spent:.3f} over {events}; lifetime budget left {left}; {release}"


def _node_key(site: SiteFile) -> str:
    if not site.node_key.is_file():
        raise FedistillError(f"node key '{site.node_key}' does not exist; run `fedistill site init` to create one.")
    if os.stat(site.node_key).st_mode & 0o077:
        raise FedistillError(f"node key '{site.node_key}' is readable by other users; run chmod 600 on it.")
    public = site.node_key.with_name(site.node_key.name + ".pub")
    return f"{site.node_key} (public key {node_key_fingerprint(public)})"


def _certificate(site: SiteFile) -> str:
    status = check_certificate(site.ca_certificate, "[coordinator] ca_certificate")
    return f"{status.subject}, valid until {status.not_after:%Y-%m-%d} ({status.days_left:.0f} days)"


def _coordinator(site: SiteFile) -> str:
    """A TLS handshake with the coordinator, verified against the consortium CA and the address's host name."""
    host, _, port = site.coordinator_address.rpartition(":")
    context = ssl.create_default_context(cafile=str(site.ca_certificate))
    try:
        with socket.create_connection((host, int(port)), timeout=CONNECT_TIMEOUT_S) as raw:
            with context.wrap_socket(raw, server_hostname=host) as tls:
                version, certificate = tls.version(), tls.getpeercert()
    except ssl.SSLCertVerificationError as err:
        raise FedistillError(f"coordinator {site.coordinator_address}: its certificate does not verify against "
                             f"{site.ca_certificate} ({err.verify_message}); check the address and the CA file.") from None
    except OSError as err:
        raise CoordinatorUnreachable(f"coordinator {site.coordinator_address} is not reachable ({err}); check the "
                                     "address, the firewall, and that the coordinator is running.") from None
    not_after = ssl.cert_time_to_seconds(certificate["notAfter"])
    days = (not_after - time.time()) / 86400
    if days < EXPIRY_WARNING_DAYS:
        raise FedistillError(f"coordinator {site.coordinator_address}: its certificate expires in {days:.0f} day(s); "
                             "ask the operator to renew it.")
    return f"{site.coordinator_address} answers over {version}; certificate verified, {days:.0f} days left"


def _registration(site: SiteFile) -> CheckItem:
    """Ask the coordinator whether it knows this site's node key, as `site start` will (client/registration.py)."""
    public = site.node_key.with_name(site.node_key.name + ".pub")
    try:
        known = node_key_registered(site.coordinator_address, site.ca_certificate, site.node_key, CONNECT_TIMEOUT_S)
    except CoordinatorUnreachable as err:
        # Nothing was learnt about the key: neither a pass nor a failure of this check.
        return CheckItem(REGISTRATION, None, f"not checked: coordinator unreachable ({err})")
    except FedistillError as err:
        return CheckItem(REGISTRATION, False, str(err))
    if not known:
        return CheckItem(REGISTRATION, False, (
            f"the coordinator at {site.coordinator_address} does not know this site's node key "
            f"({node_key_fingerprint(public)}), so `site start` would be refused. Send {public} to the consortium "
            f"operator, who registers it with `fedistill coordinator add-site {site.name} {public.name} --dir "
            "COORDINATOR_DIR`; then check again."))
    return CheckItem(REGISTRATION, True, f"the coordinator knows this site's node key ({node_key_fingerprint(public)})")


def _classification_checks(site: SiteFile, items: list[CheckItem], attempt: Callable[[str, Callable[[], Any]], Any]
                           ) -> None:
    if site.preprocessor is not None:
        attempt(PREPROCESSING, lambda: _preprocessing(site))
    records = attempt("data", lambda: _records(site))
    if records is None:
        # The teacher cannot be loaded on records that failed, but a declaration DP runs refuse still fails.
        declared, usable = _declaration(site)
        items.append(CheckItem("teacher", None, "skipped: the data check failed") if usable else
                     CheckItem("teacher", False, f"not loaded: the data check failed\n{declared}"))
    else:
        attempt("teacher", lambda: _teacher(site, records))


def _text_checks(site: SiteFile, items: list[CheckItem], attempt: Callable[[str, Callable[[], Any]], Any]) -> None:
    """Data, teacher and student base of a text site: the teacher loads first, since its tokenizer splits the data."""
    from distill.causal_lm import load_causal_lm_teacher

    teacher, failure = None, None
    try:
        teacher = load_causal_lm_teacher(site.teacher_path)
    except FedistillError as err:
        failure = err
    text = attempt("data", lambda: _documents(site, teacher))
    if failure is not None:
        declared, _ = _declaration(site)
        items.append(CheckItem("teacher", False, f"{failure}\n{declared}"))
    else:
        attempt("teacher", lambda: _causal_teacher(site, teacher, text))
    attempt(STUDENT_BASE, lambda: _student_base(site))


def run_checks(site_file: Path, connect: bool = True,
               run_config: Path | None = None) -> tuple[SiteFile | None, list[CheckItem]]:
    items: list[CheckItem] = []
    failures: dict[str, FedistillError] = {}

    def attempt(name: str, check: Callable[[], Any]) -> Any:
        try:
            result = check()
        except FedistillError as err:
            failures[name] = err
            items.append(CheckItem(name, False, str(err)))
            return None
        detail, value = result if isinstance(result, tuple) else (result, True)
        items.append(CheckItem(name, True, detail))
        return value

    site = attempt("configuration", lambda: (f"{site_file} parses; site '{(s := SiteFile.load(site_file)).name}'", s))
    if site is None:
        return None, items
    if site.text_site:
        _text_checks(site, items, attempt)
    else:
        _classification_checks(site, items, attempt)
    if run_config is not None:
        attempt(RUN_CONFIG, lambda: _run_config(site, run_config))
    if site.proxy_set is not None:
        attempt("proxy set", lambda: _proxy_set(site))
    attempt("privacy budget", lambda: _budget(site))
    node_key = attempt("node key", lambda: _node_key(site))
    certificate = attempt("CA certificate", lambda: _certificate(site))
    if not connect:
        items.append(CheckItem("coordinator", None, "skipped (--offline)"))
        items.append(CheckItem(REGISTRATION, None, "skipped (--offline)"))
    elif certificate is None:
        items.append(CheckItem("coordinator", None, "skipped: the CA certificate check failed"))
        items.append(CheckItem(REGISTRATION, None, "skipped: the CA certificate check failed"))
    else:
        attempt("coordinator", lambda: _coordinator(site))
        if isinstance(failures.get("coordinator"), CoordinatorUnreachable):
            items.append(CheckItem(REGISTRATION, None, "not checked: coordinator unreachable"))
        elif node_key is None:
            items.append(CheckItem(REGISTRATION, None, "skipped: the node key check failed"))
        else:
            items.append(_registration(site))
    return site, items


def checks_to_json(site_file: Path, items: list[CheckItem]) -> dict[str, Any]:
    return {"schema_version": 1, "site_file": str(site_file), "ok": all(i.ok is not False for i in items),
            "checks": [asdict(i) for i in items]}
