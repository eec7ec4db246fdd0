"""An exported student's signature, and ``fedistill verify-model``: the files, the key, the run that made them.

    EXPORT/model.sig                    OpenSSF model signing: a Sigstore bundle around an in-toto statement
                                        listing the SHA-256 of every file in EXPORT (``model-signing``, EC key)
    EXPORT/model_signing_key.pub.pem    the P-256 public key that signed it
    EXPORT/provenance/ledger.jsonl      a copy of the run's coordinator ledger, and its Ed25519 public key
    EXPORT/provenance/ledger_key.pub.pem
    EXPORT/provenance/endorsement.json  the coordinator's ledger key signing the model-signing key's fingerprint

The model-signing signer takes P-256 keys, not the Ed25519 key the ledger is signed with, so the coordinator holds
a second key (made with ``cryptography``). The endorsement binds the two: the key every site pinned when it accepted
the run vouches for the key that signed the export. :func:`verify_model` checks, in order: the bundle against the
files (any edited, added or removed file fails), the endorsement, the ledger copy's chain and signatures, and that
the exported weights hash to the final student the signed ``run-finished`` event names. The model-signing CLI
verifies the same bundle on its own: ``model_signing verify key --signature EXPORT/model.sig --public_key
EXPORT/model_signing_key.pub.pem EXPORT``.
"""

from __future__ import annotations

import base64
import json
import re
from importlib.metadata import version
from pathlib import Path
from typing import Any

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from safetensors import SafetensorError
from safetensors.numpy import load_file

from protocols.canonical import atomic_write_bytes, atomic_write_json, canonical_json, digest_arrays, sha256_hex
from protocols.errors import ConfigError, LedgerTampered
from protocols.ledger import (key_fingerprint, load_signing_key, public_key_pem, read_events, signed_up_to,
                              verify_ledger, verify_signature)
from protocols.pki import MODEL_SIGNING_KEY_FILE, load_model_signing_key

SCHEMA_VERSION = 1
SIGNATURE_FILE = "model.sig"
PUBLIC_KEY_FILE = "model_signing_key.pub.pem"
PROVENANCE = "provenance"
ENDORSEMENT_FILE = "endorsement.json"
MANIFEST_FILE = "fedistill_export.json"
DEFAULT_KEY_FILE = MODEL_SIGNING_KEY_FILE


# --------------------------------------------------------------------------------------------- the P-256 key
def _ec_public_pem(key: ec.EllipticCurvePrivateKey) -> str:
    return key.public_key().public_bytes(serialization.Encoding.PEM,
                                         serialization.PublicFormat.SubjectPublicKeyInfo).decode("ascii")


def ec_key_fingerprint(pem: str) -> str:
    """``SHA256:<hex>`` of the DER SubjectPublicKeyInfo of a P-256 public key."""
    try:
        key = serialization.load_pem_public_key(pem.encode("utf-8"))
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise LedgerTampered(f"not a PEM public key: {exc}") from None
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise LedgerTampered(f"the model-signing public key is {type(key).__name__}, not an EC key.")
    return "SHA256:" + sha256_hex(key.public_bytes(serialization.Encoding.DER,
                                                   serialization.PublicFormat.SubjectPublicKeyInfo))


# --------------------------------------------------------------------------------------------- the run's evidence
def signed_final_student(ledger_path: Path, public_key_pem_text: str) -> dict[str, Any]:
    """The signed ``run-finished`` event of a verified coordinator ledger, with the ledger's head.

    A ledger without one (a run still running or crashed) is refused by name: its last round is not vouched for.
    """
    report = verify_ledger(ledger_path, public_key_pem_text)
    events = read_events(ledger_path)
    signed = signed_up_to(events)
    finished = [e for e in events if e["kind"] == "run-finished" and e["seq"] <= signed]
    if not finished:
        raise ConfigError(f"{ledger_path}: the run has not finished (no signed run-finished event), so no final "
                          "student is vouched for. Let the run finish, or resume it, then export.")
    return {**finished[-1]["payload"], "ledger_head": {"seq": report.head_seq, "hash": report.head_hash},
            "ledger_key_fingerprint": key_fingerprint(public_key_pem_text)}


def weights_digest(path: Path) -> str:
    """The digest the ledger records for a student: over its tensors' names, dtypes, shapes and bytes."""
    try:
        return digest_arrays(load_file(str(path)))
    except (SafetensorError, OSError) as err:
        raise LedgerTampered(f"{path} cannot be read as a safetensors file ({type(err).__name__}); the weights "
                             "were damaged or replaced.") from None


# --------------------------------------------------------------------------------------------- signing
def _endorsement_payload(run_id: str, model_key_fingerprint: str) -> str:
    return canonical_json({"schema_version": SCHEMA_VERSION, "run_id": run_id,
                           "model_signing_key": model_key_fingerprint})


def write_provenance(export_dir: Path, run_dir: Path, run_id: str, signing_key: Path,
                     ledger_key: Path) -> dict[str, Any]:
    """Copy the run's ledger into ``provenance/``, write the P-256 public key, and endorse it with the ledger key."""
    export_dir, run_dir = Path(export_dir), Path(run_dir)
    key = load_model_signing_key(signing_key)
    ledger_private = load_signing_key(ledger_key)
    ledger_public = public_key_pem(ledger_private)
    run_public = (run_dir / "ledger_key.pub.pem").read_text()
    if key_fingerprint(ledger_public) != key_fingerprint(run_public):
        raise ConfigError(f"--ledger-key {ledger_key} is not the key that signs {run_dir / 'ledger.jsonl'} (its "
                          f"fingerprint is {key_fingerprint(ledger_public)}, the run's is "
                          f"{key_fingerprint(run_public)}); pass the coordinator's ledger key of this run.")
    provenance = export_dir / PROVENANCE
    atomic_write_bytes(provenance / "ledger.jsonl", (run_dir / "ledger.jsonl").read_bytes())
    atomic_write_bytes(provenance / "ledger_key.pub.pem", run_public.encode("ascii"))
    model_pem = _ec_public_pem(key)
    atomic_write_bytes(export_dir / PUBLIC_KEY_FILE, model_pem.encode("ascii"))
    fingerprint = ec_key_fingerprint(model_pem)
    payload = _endorsement_payload(run_id, fingerprint)
    atomic_write_json(provenance / ENDORSEMENT_FILE, {
        "schema_version": SCHEMA_VERSION, "run_id": run_id, "model_signing_key": fingerprint,
        "signed_by": key_fingerprint(ledger_public),
        "signature": base64.b64encode(ledger_private.sign(sha256_hex(payload).encode("utf-8"))).decode("ascii")})
    return {"format": "OpenSSF model signing v1.0 (Sigstore bundle, DSSE, in-toto statement), model-signing "
                      f"{version('model-signing')}",
            "file": SIGNATURE_FILE, "public_key": PUBLIC_KEY_FILE, "key_fingerprint": fingerprint,
            "endorsed_by": key_fingerprint(ledger_public)}


def sign_folder(export_dir: Path, signing_key: Path) -> Path:
    """The bundle over every file of the folder but itself; written last, so it covers everything else."""
    import model_signing

    export_dir = Path(export_dir)
    load_model_signing_key(signing_key)
    (export_dir / SIGNATURE_FILE).unlink(missing_ok=True)
    model_signing.signing.Config().use_elliptic_key_signer(private_key=Path(signing_key)).set_hashing_config(
        model_signing.hashing.Config().set_ignored_paths(paths=[SIGNATURE_FILE])).sign(
            export_dir, export_dir / SIGNATURE_FILE)
    return export_dir / SIGNATURE_FILE


# --------------------------------------------------------------------------------------------- verify-model
def verify_model(export_dir: Path, public_key: Path | None = None, run_dir: Path | None = None) -> dict[str, Any]:
    """Every check on an exported student; raises :class:`LedgerTampered` naming the file at the first failure.

    ``public_key`` pins the model-signing key (else the folder's own, whose fingerprint the result states so that it
    can be compared with the one the consortium published); ``run_dir`` pins the run: its ledger key must be the
    one that signed the ledger copy, and its ledger must hold the copy's head.
    """
    import model_signing

    export_dir = Path(export_dir)
    checks: list[str] = []
    manifest_path = export_dir / MANIFEST_FILE
    if not manifest_path.is_file():
        raise LedgerTampered(f"{manifest_path} is missing: {export_dir} is not a fedistill export (or was damaged). "
                             "Export the run again with `fedistill export`.")
    signature = export_dir / SIGNATURE_FILE
    key_path = Path(public_key) if public_key is not None else export_dir / PUBLIC_KEY_FILE
    for path, what in ((signature, "the signature bundle"), (key_path, "the model-signing public key")):
        if not path.is_file():
            raise LedgerTampered(f"{path} is missing ({what}): nothing vouches for the exported files.")
    try:
        model_signing.verifying.Config().use_elliptic_key_verifier(public_key=key_path).verify(export_dir, signature)
    except Exception as err:  # model-signing raises ValueError and protobuf/crypto errors alike: all are failures
        raise LedgerTampered(f"{signature}: the signature does not verify over {export_dir} with {key_path}: "
                             f"{_what_changed(str(err))}. Do not deploy it; export the run again.") from None
    fingerprint = ec_key_fingerprint(key_path.read_text())
    checks.append(f"model.sig: every file's SHA-256 is the signed one, signed by {fingerprint[:19]}...")
    provenance = export_dir / PROVENANCE
    ledger_pem_path = provenance / "ledger_key.pub.pem"
    endorsement_path = provenance / ENDORSEMENT_FILE
    for path in (ledger_pem_path, endorsement_path, provenance / "ledger.jsonl"):
        if not path.is_file():
            raise LedgerTampered(f"{path} is missing (missing evidence): the export cannot be traced to its run.")
    manifest = json.loads(manifest_path.read_text())
    endorsement = json.loads(endorsement_path.read_text())
    ledger_pem = ledger_pem_path.read_text()
    payload = _endorsement_payload(str(manifest.get("run_id")), fingerprint)
    if endorsement.get("model_signing_key") != fingerprint or not verify_signature(
            ledger_pem, sha256_hex(payload), str(endorsement.get("signature", ""))):
        raise LedgerTampered(f"{endorsement_path}: the run's ledger key does not endorse the model-signing key "
                             f"{fingerprint} for run {manifest.get('run_id')}.")
    checks.append(f"endorsement: the coordinator's ledger key {key_fingerprint(ledger_pem)[:19]}... vouches for the "
                  "model-signing key")
    final = signed_final_student(provenance / "ledger.jsonl", ledger_pem)
    if final["run_id"] != manifest.get("run_id") or final["config_hash"] != manifest.get("config_hash"):
        raise LedgerTampered(f"{manifest_path}: names run {manifest.get('run_id')}, but the ledger copy's run-finished "
                             f"event is run {final['run_id']}.")
    checks.append(f"ledger copy: chain and checkpoint signatures verify; run-finished at round {final['final_round']}")
    weights = export_dir / str(manifest.get("ledger_weights", "model.safetensors"))
    if not weights.is_file():
        raise LedgerTampered(f"{weights} is missing: the export holds no weights the ledger could vouch for.")
    actual = weights_digest(weights)
    if actual != final["student_digest"]:
        raise LedgerTampered(f"{weights}: the weights hash to {actual[:12]}..., not {final['student_digest'][:12]}..., "
                             "the final student the run's signed ledger records.")
    checks.append(f"{weights.name}: hashes to the final student the signed ledger records "
                  f"({actual[:12]}...)")
    if run_dir is not None:
        _pin_run(Path(run_dir), ledger_pem, final, checks)
    return {"schema_version": SCHEMA_VERSION, "verified": True, "export_dir": str(export_dir),
            "run_id": final["run_id"], "student_digest": final["student_digest"],
            "model_signing_key": fingerprint, "ledger_key": key_fingerprint(ledger_pem),
            "key_pinned": public_key is not None, "run_pinned": run_dir is not None, "checks": checks}


def _what_changed(message: str) -> str:
    """model-signing's mismatch report as file names (its digests are byte reprs nobody reads)."""
    changed = re.findall(r"Hash mismatch for '([^']+)'", message)
    parts = [f"changed since signing: {', '.join(changed)}"] if changed else []
    for kind in ("Extra files found", "Missing files"):
        found = re.search(kind + r" in model '[^']*': ([^\]\"]+)", message)
        if found:
            parts.append(f"{'added' if kind.startswith('Extra') else 'removed'}: {found.group(1).strip()}")
    return "; ".join(parts) if parts else message[:400]


def _pin_run(run_dir: Path, ledger_pem: str, final: dict[str, Any], checks: list[str]) -> None:
    run_pem_path = run_dir / "ledger_key.pub.pem"
    if not run_pem_path.is_file():
        raise LedgerTampered(f"{run_pem_path} is missing: --run must be the run directory that was exported.")
    if key_fingerprint(run_pem_path.read_text()) != key_fingerprint(ledger_pem):
        raise LedgerTampered(f"{run_pem_path}: the run's ledger key is not the one that signed the export's ledger "
                             "copy; the export comes from another coordinator.")
    events = read_events(run_dir / "ledger.jsonl")
    head = final["ledger_head"]
    if not any(e["seq"] == head["seq"] and e["hash"] == head["hash"] for e in events):
        raise LedgerTampered(f"{run_dir / 'ledger.jsonl'} does not hold the export's ledger head (seq {head['seq']}); "
                             "the export comes from another run.")
    checks.append(f"--run {run_dir.name}: its ledger key signed the copy and its ledger holds the copy's head")
