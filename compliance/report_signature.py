"""The detached signature of ``report.json``: the coordinator's ledger key signs exactly the bytes it wrote.

    report/report.json       the report (its envelope's report_id is recomputable from its content)
    report/report.json.sig   {"schema_version", "file", "sha256", "signature", "key_fingerprint", "public_key"}

``signature`` is the base64 Ed25519 signature of the UTF-8 bytes of ``sha256`` (the hex SHA-256 of the file), the
same scheme as a ledger checkpoint. Whoever holds only the report checks it with :func:`verify_report`; the key is
the one the coordinator's ledger checkpoints are signed with, and the one every site pinned when it accepted the
run, so its fingerprint is what an auditor compares with the sites' ledgers (or reads out to the operator).
"""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

from protocols.canonical import atomic_write_json, digest_json, sha256_hex
from protocols.errors import ConfigError, LedgerTampered
from protocols.ledger import key_fingerprint, load_signing_key, public_key_pem, verify_signature

SCHEMA_VERSION = 1
SUFFIX = ".sig"


def report_id(report: dict[str, Any]) -> str:
    """SHA-256 of the canonical JSON of the report with ``report_id`` empty: anyone can recompute it."""
    blank = {**report, "envelope": {**report["envelope"], "report_id": None}}
    return digest_json(blank)


def signature_path(report_path: Path) -> Path:
    return Path(report_path).with_name(Path(report_path).name + SUFFIX)


def sign_report(report_path: Path, signing_key: Path) -> Path:
    """Write ``report.json.sig`` beside ``report_path``, signed with the coordinator's ledger key."""
    key = load_signing_key(signing_key)
    digest = sha256_hex(Path(report_path).read_bytes())
    pem = public_key_pem(key)
    path = signature_path(report_path)
    atomic_write_json(path, {"schema_version": SCHEMA_VERSION, "file": Path(report_path).name, "sha256": digest,
                             "signature": base64.b64encode(key.sign(digest.encode("utf-8"))).decode("ascii"),
                             "key_fingerprint": key_fingerprint(pem), "public_key": pem})
    return path


def _coordinator_fingerprint(report: dict[str, Any]) -> str | None:
    signatures = report.get("envelope", {}).get("signatures", [])
    return next((s.get("key_fingerprint") for s in signatures if s.get("signer_role") == "coordinator"), None)


def verify_report(report_path: Path, expected_fingerprint: str | None = None) -> dict[str, Any]:
    """Check a report on its own: its signature file, the signature, the signer, and its recomputed report_id.

    The signer must be the key the report's own envelope names for the coordinator, and ``expected_fingerprint``
    when the caller knows the coordinator's key (a run directory, or a fingerprint read out of band).
    """
    report_path = Path(report_path)
    if not report_path.is_file():
        raise LedgerTampered(f"{report_path} does not exist; pass the report.json that was handed over.")
    sig_path = signature_path(report_path)
    if not sig_path.is_file():
        raise LedgerTampered(f"{sig_path} is missing: report.json is not signed, so nothing vouches for it. Ask for "
                             "the signature file written with it by `fedistill report`.")
    data = report_path.read_bytes()
    try:
        signature = json.loads(sig_path.read_text())
        report = json.loads(data)
    except ValueError as err:
        raise LedgerTampered(f"{report_path} or its signature file is not valid JSON ({err}).") from None
    if not isinstance(signature, dict) or signature.get("schema_version") != SCHEMA_VERSION:
        raise LedgerTampered(f"{sig_path}: not a fedistill report signature (schema_version "
                             f"{signature.get('schema_version') if isinstance(signature, dict) else None!r}).")
    if signature.get("sha256") != sha256_hex(data):
        raise LedgerTampered(f"{report_path}: its SHA-256 is not the one {sig_path.name} signs; the report was "
                             "edited after it was signed.")
    pem = str(signature.get("public_key", ""))
    try:
        fingerprint = key_fingerprint(pem)
    except ConfigError as err:
        raise LedgerTampered(f"{sig_path}: the signing key is unusable ({err}).") from None
    if fingerprint != signature.get("key_fingerprint") or not verify_signature(
            pem, signature["sha256"], str(signature.get("signature", ""))):
        raise LedgerTampered(f"{sig_path}: the signature does not verify with the key it names.")
    named = _coordinator_fingerprint(report)
    if fingerprint != named:
        raise LedgerTampered(f"{report_path}: signed by key {fingerprint}, but the report names the coordinator's key "
                             f"as {named}.")
    if expected_fingerprint is not None and fingerprint != expected_fingerprint:
        raise LedgerTampered(f"{report_path}: signed by key {fingerprint}, not by the run's coordinator key "
                             f"{expected_fingerprint}.")
    recomputed = report_id(report)
    if report.get("envelope", {}).get("report_id") != recomputed:
        raise LedgerTampered(f"{report_path}: its report_id does not recompute ({recomputed}).")
    return {"report": str(report_path), "report_id": recomputed, "key_fingerprint": fingerprint,
            "subjects": report["envelope"].get("subjects", [])}
