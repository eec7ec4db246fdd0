"""The audit ledger: an append-only, hash-chained, Ed25519-signed JSON-lines file, one per site or coordinator.

Every line is one event in canonical JSON (sorted keys, no whitespace, no NaN), terminated by a newline::

    {"actor": ..., "hash": ..., "kind": ..., "payload": {...}, "prev_hash": ..., "schema_version": 1,
     "seq": 0, "time": "2026-01-01T00:00:00+00:00"}

``seq`` counts 0, 1, 2, ... without gaps; ``prev_hash`` is the ``hash`` of the previous line (64 zeros,
:data:`GENESIS`, for the first); ``hash`` is the SHA-256 of the canonical JSON of the event without ``hash``.
An event of kind ``"checkpoint"`` also signs the head before it: its payload carries ``signed_seq`` and
``signed_hash`` (that head) and ``signature``, the base64 Ed25519 signature of the UTF-8 bytes of
``signed_hash``. The hash chain commits to every earlier line, so one signature covers the whole prefix.

What this guarantees, and what not: the ledger is tamper-evident, not tamper-proof. Editing, inserting,
deleting or reordering a line, or a torn write, breaks the chain at the first line affected, and
:func:`verify_ledger` names that line. Whoever holds the signing key can still rewrite the whole file and
sign new checkpoints; removing lines at the end leaves a shorter chain that verifies. Both are caught only
against heads recorded elsewhere: the checkpoints exist so that other parties (the coordinator, an auditor)
record a signed ``(signed_seq, signed_hash)`` that a rewritten or truncated ledger can no longer match.

A ledger has one writer: a :class:`Ledger` keeps the head in memory and assumes no other process appends.
"""

from __future__ import annotations

import base64
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from protocols.canonical import canonical_json, sha256_hex
from protocols.errors import ConfigError, LedgerTampered

SCHEMA_VERSION = 1
GENESIS = "0" * 64
CHECKPOINT = "checkpoint"
EVENT_FIELDS = frozenset({"schema_version", "seq", "time", "actor", "kind", "payload", "prev_hash", "hash"})
CHECKPOINT_FIELDS = frozenset({"signed_seq", "signed_hash", "signature"})
_HEX_DIGEST = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class LedgerReport:
    """What a verified ledger holds; ``head_seq``/``head_hash`` are what another party should record."""

    path: Path
    events: int
    checkpoints: int
    head_seq: int
    head_hash: str
    last_checkpoint: dict[str, Any] | None = None


def _event_hash(event: dict[str, Any]) -> str:
    return sha256_hex(canonical_json({key: value for key, value in event.items() if key != "hash"}))


def _tampered(path: Path, number: int, what: str) -> LedgerTampered:
    return LedgerTampered(f"{path}, line {number}: {what}. The ledger does not verify; keep the file unchanged "
                          "as evidence and do not trust anything from this line on.")


def _json_payload(payload: Any) -> dict[str, Any]:
    """The payload as a reader will parse it back (tuples become lists), so the returned event equals the line."""
    if not isinstance(payload, dict):
        raise ConfigError(f"a ledger payload must be a dict, got {type(payload).__name__}.")
    try:
        text = canonical_json(payload)
        text.encode("utf-8")  # a lone surrogate passes json.dumps but has no UTF-8 form
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"a ledger payload must be JSON-serialisable without NaN or infinity: {exc}") from exc
    return json.loads(text)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid in canonical JSON")


def _parse_line(path: Path, number: int, raw: bytes, last: bool) -> dict[str, Any]:
    try:
        text = raw.decode("utf-8")
        event = json.loads(text, parse_constant=_reject_constant)
    except ValueError as exc:
        if last:
            raise _tampered(path, number, f"the last line is torn (not a complete JSON event: {exc}); the writer "
                                          "was probably interrupted") from exc
        raise _tampered(path, number, f"not valid JSON ({exc})") from exc
    if not isinstance(event, dict):
        raise _tampered(path, number, f"not a JSON object but {type(event).__name__}")
    if canonical_json(event) != text:
        raise _tampered(path, number, "not in canonical JSON (sorted keys, no whitespace), so not as written")
    return event


def _iter_events(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """Lines one at a time with their 1-based numbers, so a verifier stops at the first failure, not the last."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise LedgerTampered(f"{path}: the ledger file is missing (missing evidence). A site or coordinator "
                             "that took part must have it; restore it from where it was kept.") from None
    *complete, tail = data.split(b"\n")
    for number, raw in enumerate(complete, start=1):
        yield number, _parse_line(path, number, raw, last=number == len(complete) and not tail)
    if tail:
        raise _tampered(path, len(complete) + 1, "the last line is torn (no trailing newline); the writer was "
                                                 "probably interrupted")


def read_events(path: Path) -> list[dict[str, Any]]:
    """Every event in file order, parsed but not verified (use :func:`verify_ledger` for that)."""
    return [event for _, event in _iter_events(path)]


def _check_fields(path: Path, number: int, event: dict[str, Any]) -> None:
    if set(event) != EVENT_FIELDS:
        missing, extra = sorted(EVENT_FIELDS - set(event)), sorted(set(event) - EVENT_FIELDS)
        raise _tampered(path, number, f"fields do not match the event schema (missing {missing}, extra {extra})")
    if type(event["schema_version"]) is not int or event["schema_version"] != SCHEMA_VERSION:
        raise _tampered(path, number, f"schema_version {event['schema_version']!r} is not {SCHEMA_VERSION}")
    if type(event["seq"]) is not int:
        raise _tampered(path, number, f"seq {event['seq']!r} is not an integer")
    for name in ("actor", "kind"):
        if not isinstance(event[name], str) or not event[name]:
            raise _tampered(path, number, f"field '{name}' is not a non-empty string")
    if not isinstance(event["payload"], dict):
        raise _tampered(path, number, "field 'payload' is not a JSON object")
    for name in ("prev_hash", "hash"):
        if not isinstance(event[name], str) or not _HEX_DIGEST.fullmatch(event[name]):
            raise _tampered(path, number, f"field '{name}' is not a SHA-256 hex digest")
    try:
        aware = isinstance(event["time"], str) and datetime.fromisoformat(event["time"]).tzinfo is not None
    except ValueError:
        aware = False
    if not aware:
        raise _tampered(path, number, f"time {event['time']!r} is not ISO-8601 with a timezone")


def _check_checkpoint(path: Path, number: int, payload: dict[str, Any], head: tuple[int, str],
                      public_key: Ed25519PublicKey | None) -> None:
    missing = sorted(CHECKPOINT_FIELDS - set(payload))
    if missing:
        raise _tampered(path, number, f"checkpoint payload lacks {missing}")
    if type(payload["signed_seq"]) is not int or (payload["signed_seq"], payload["signed_hash"]) != head:
        raise _tampered(path, number, f"checkpoint signs head ({payload['signed_seq']!r}, "
                                      f"{payload['signed_hash']!r}), but the event before it is {head}")
    if public_key is None:
        return
    try:
        public_key.verify(base64.b64decode(payload["signature"], validate=True), head[1].encode("utf-8"))
    except (InvalidSignature, ValueError, TypeError):
        raise _tampered(path, number, "checkpoint signature does not verify with the given public key") from None


def _verify(path: Path, actor: str | None, public_key: Ed25519PublicKey | None) -> LedgerReport:
    """The chain checks shared by :func:`verify_ledger` and :class:`Ledger` (which has no peer's key to check)."""
    path = Path(path)
    head: tuple[int, str] = (-1, GENESIS)
    events = checkpoints = 0
    last_checkpoint = None
    for number, event in _iter_events(path):
        _check_fields(path, number, event)
        if event["seq"] != head[0] + 1:
            raise _tampered(path, number, f"seq {event['seq']} where {head[0] + 1} was expected (a line was "
                                          "deleted, inserted or moved)")
        if event["prev_hash"] != head[1]:
            raise _tampered(path, number, "prev_hash does not match the hash of the event before it")
        if _event_hash(event) != event["hash"]:
            raise _tampered(path, number, "hash does not match the event's content (the line was edited)")
        if actor is not None and event["actor"] != actor:
            raise _tampered(path, number, f"actor {event['actor']!r} is not {actor!r}")
        if event["kind"] == CHECKPOINT:
            _check_checkpoint(path, number, event["payload"], head, public_key)
            checkpoints += 1
            last_checkpoint = event["payload"]
        head = (event["seq"], event["hash"])
        events += 1
    return LedgerReport(path=path, events=events, checkpoints=checkpoints, head_seq=head[0], head_hash=head[1],
                        last_checkpoint=last_checkpoint)


def signed_up_to(events: list[dict[str, Any]]) -> int:
    """The last seq a checkpoint signed (-1 before the first): events after it are chained but unsigned, so anyone
    could have appended or edited them."""
    return max((e["payload"]["signed_seq"] for e in events if e["kind"] == CHECKPOINT), default=-1)


def verify_ledger(path: Path, public_key_pem: str, actor: str | None = None) -> LedgerReport:
    """Re-read the file and check every line, its links and every checkpoint signature; raise at the first failure.

    A missing file is missing evidence and fails; an empty file is a ledger with no events yet.
    """
    return _verify(Path(path), actor, load_public_key(public_key_pem))


class Ledger:
    """The writer of one actor's ledger; reopening an existing file verifies it and continues its chain."""

    def __init__(self, path: Path, actor: str, signing_key: Ed25519PrivateKey) -> None:
        if not isinstance(actor, str) or not actor:
            raise ConfigError(f"a ledger actor must be a non-empty string, got {actor!r}.")
        if not isinstance(signing_key, Ed25519PrivateKey):
            raise ConfigError(f"a ledger signing key must be an Ed25519 private key, got "
                              f"{type(signing_key).__name__}.")
        self.path = Path(path)
        self.actor = actor
        self._key = signing_key
        self._head: tuple[int, str] = (-1, GENESIS)
        self._last_checkpoint: dict[str, Any] | None = None
        if self.path.exists():
            report = _verify(self.path, actor, public_key=None)
            self._head = (report.head_seq, report.head_hash)
            self._last_checkpoint = report.last_checkpoint

    @property
    def public_key_pem(self) -> str:
        return public_key_pem(self._key)

    @property
    def last_checkpoint(self) -> dict[str, Any] | None:
        """The payload of the latest signed checkpoint (``signed_seq``, ``signed_hash``, ``signature``, ...)."""
        return self._last_checkpoint

    @property
    def head(self) -> tuple[int, str]:
        """Seq and hash of the last event; ``(-1, GENESIS)`` before the first."""
        return self._head

    def append(self, kind: str, payload: dict[str, Any]) -> dict[str, Any]:
        """Write one event and fsync it before returning: an event the caller saw is on disk."""
        if not isinstance(kind, str) or not kind:
            raise ConfigError(f"a ledger event kind must be a non-empty string, got {kind!r}.")
        if kind == CHECKPOINT:
            raise ConfigError("checkpoint events are signed: write them with Ledger.checkpoint().")
        return self._write(kind, _json_payload(payload))

    def checkpoint(self, payload: dict[str, Any]) -> dict[str, Any]:
        """Sign the current head, so that parties who record this event can later detect a rewritten ledger."""
        payload = _json_payload(payload)
        reserved = sorted(CHECKPOINT_FIELDS & set(payload))
        if reserved:
            raise ConfigError(f"a checkpoint payload may not set {reserved}: the ledger fills them in.")
        seq, head_hash = self._head
        signature = base64.b64encode(self._key.sign(head_hash.encode("utf-8"))).decode("ascii")
        event = self._write(CHECKPOINT, {**payload, "signed_seq": seq, "signed_hash": head_hash,
                                         "signature": signature})
        self._last_checkpoint = event["payload"]
        return event

    def _write(self, kind: str, payload: dict[str, Any]) -> dict[str, Any]:
        seq, prev_hash = self._head
        event: dict[str, Any] = {"schema_version": SCHEMA_VERSION, "seq": seq + 1,
                                 "time": datetime.now(timezone.utc).isoformat(), "actor": self.actor,
                                 "kind": kind, "payload": payload, "prev_hash": prev_hash}
        event["hash"] = _event_hash(event)
        line = (canonical_json(event) + "\n").encode("utf-8")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # One write of the whole line: a crash leaves at most a torn last line, which every reader reports.
        with open(self.path, "ab") as handle:
            handle.write(line)
            handle.flush()
            os.fsync(handle.fileno())
        self._head = (event["seq"], event["hash"])
        return event


def generate_signing_key(path: Path) -> Ed25519PrivateKey:
    """Create a new key in an owner-only file; never overwrite one, since that would orphan its checkpoints."""
    path = Path(path)
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise ConfigError(f"{path} already exists: refusing to overwrite a signing key. Load it with "
                          "load_signing_key, or choose another path.") from None
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(pem)
            handle.flush()
            os.fsync(handle.fileno())
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    return key


def load_signing_key(path: Path) -> Ed25519PrivateKey:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: signing key file is missing. Create one with generate_signing_key, or point "
                          "to the existing key.")
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise ConfigError(f"{path}: not an unencrypted PEM private key ({exc}).") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise ConfigError(f"{path}: the key is {type(key).__name__}, not Ed25519.")
    return key


def public_key_pem(key: Ed25519PrivateKey) -> str:
    """The public half as SubjectPublicKeyInfo PEM: what a ledger's owner gives to those who verify it."""
    return key.public_key().public_bytes(serialization.Encoding.PEM,
                                         serialization.PublicFormat.SubjectPublicKeyInfo).decode("ascii")


def key_fingerprint(pem: str) -> str:
    """``SHA256:<hex>`` of the raw Ed25519 public key: what one party pins and reads out to another."""
    raw = load_public_key(pem).public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return "SHA256:" + sha256_hex(raw)


def verify_signature(pem: str, signed_hash: str, signature: str) -> bool:
    """Whether ``signature`` (base64) is the key's Ed25519 signature of ``signed_hash``, as a checkpoint carries."""
    try:
        load_public_key(pem).verify(base64.b64decode(signature, validate=True), signed_hash.encode("utf-8"))
    except (InvalidSignature, ValueError, TypeError, ConfigError):
        return False
    return True


def load_public_key(pem: str) -> Ed25519PublicKey:
    if not isinstance(pem, str):
        raise ConfigError(f"a public key must be PEM text, got {type(pem).__name__}.")
    try:
        key = serialization.load_pem_public_key(pem.encode("utf-8"))
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise ConfigError(f"not a PEM public key: {exc}") from exc
    if not isinstance(key, Ed25519PublicKey):
        raise ConfigError(f"the public key is {type(key).__name__}, not Ed25519.")
    return key


def ledger_in(directory: Path, actor: str, name: str = "ledger", key_path: Path | None = None) -> Ledger:
    """The ledger ``<name>.jsonl`` of a site or run directory, with its key (created on first use).

    The private key stays in ``<name>_key.pem`` (mode 0600), or in ``key_path`` when the actor has one key
    for all its ledgers (a deployed coordinator); ``<name>_key.pub.pem`` beside the ledger is what an auditor
    verifies the checkpoints with.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    key_path = key_path or directory / f"{name}_key.pem"
    key = load_signing_key(key_path) if key_path.is_file() else generate_signing_key(key_path)
    public_path = directory / f"{name}_key.pub.pem"
    if not public_path.is_file():
        public_path.write_text(public_key_pem(key))
    return Ledger(directory / f"{name}.jsonl", actor, key)


def resumable_run(path: Path, run_id: str, config_hash: str) -> list[dict[str, Any]]:
    """The events of run ``run_id``'s ledger, if the run can be continued under ``config_hash``.

    A run is continued only with the configuration it started with: the ledger's run-started event names it.
    """
    if not Path(path).is_file():
        raise ConfigError(f"cannot resume run {run_id}: {path} does not exist; check the run id and out_dir in "
                          "run.toml.")
    events = read_events(path)
    started = next((e["payload"] for e in events if e["kind"] == "run-started"), None)
    if started is None or started["config_hash"] != config_hash:
        raise ConfigError(f"cannot resume run {run_id}: it started with config hash "
                          f"{started and started['config_hash']}, but this configuration hashes to {config_hash}; "
                          "resume with the run.toml the run started with.")
    return events
