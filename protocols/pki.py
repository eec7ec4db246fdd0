"""Certificates and node keys for deployment, made with ``cryptography``.

The consortium operator holds a CA; the coordinator's TLS certificate is signed by it with subject
alternative names for every address the sites dial. Each site holds an EC node key (NIST P-256, OpenSSH
format, as Flower's SuperNode authentication expects); only the public half goes to the operator.
"""

from __future__ import annotations

import base64
import hashlib
import ipaddress
import os
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from protocols.errors import ConfigError

CA_DAYS = 3650
SERVER_DAYS = 365
EXPIRY_WARNING_DAYS = 30
# Issued a few minutes in the past, so a site whose clock lags slightly still accepts the certificate.
CLOCK_SKEW = timedelta(minutes=5)


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _write_private(path: Path, data: bytes) -> None:
    """Private keys are written with mode 0600 from the start, never readable by others even briefly."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _san_entry(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


@dataclass(frozen=True)
class CoordinatorCertificates:
    ca_certificate: Path
    ca_key: Path
    server_certificate: Path
    server_key: Path


def create_certificates(directory: Path, hosts: list[str], organisation: str) -> CoordinatorCertificates:
    """A CA (10 years) and a server certificate (1 year) for ``hosts``, written as PEM under ``directory``."""
    if not hosts:
        raise ConfigError("--host: at least one host name or IP address the sites will dial is needed.")
    now = datetime.now(UTC) - CLOCK_SKEW
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = _name(f"{organisation} fedistill CA")
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now)
          .not_valid_after(now + timedelta(days=CA_DAYS))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                       content_commitment=False, key_encipherment=False, data_encipherment=False,
                                       key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
          .sign(ca_key, hashes.SHA256()))
    server_key = ec.generate_private_key(ec.SECP256R1())
    server = (x509.CertificateBuilder().subject_name(_name(hosts[0])).issuer_name(ca_name)
              .public_key(server_key.public_key()).serial_number(x509.random_serial_number())
              .not_valid_before(now).not_valid_after(now + timedelta(days=SERVER_DAYS))
              .add_extension(x509.SubjectAlternativeName([_san_entry(h) for h in dict.fromkeys(hosts)]),
                             critical=False)
              .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
              .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
              .sign(ca_key, hashes.SHA256()))
    paths = CoordinatorCertificates(directory / "ca.crt", directory / "ca.key", directory / "server.pem",
                                    directory / "server.key")
    directory.mkdir(parents=True, exist_ok=True)
    _write_private(paths.ca_key, _pem_key(ca_key))
    _write_private(paths.server_key, _pem_key(server_key))
    paths.ca_certificate.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths.server_certificate.write_bytes(server.public_bytes(serialization.Encoding.PEM))
    return paths


# The coordinator's model-signing key: OpenSSF model signing takes EC keys (P-256/384/521), not the Ed25519 ledger key.
MODEL_SIGNING_KEY_FILE = "model_signing_key.pem"


def generate_model_signing_key(path: Path) -> ec.EllipticCurvePrivateKey:
    """A new P-256 key in an owner-only file; an existing key is never overwritten (its signatures would orphan)."""
    path = Path(path)
    key = ec.generate_private_key(ec.SECP256R1())
    pem = _pem_key(key)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise ConfigError(f"{path} already exists: refusing to overwrite a model-signing key.") from None
    with os.fdopen(fd, "wb") as handle:
        handle.write(pem)
        handle.flush()
        os.fsync(handle.fileno())
    return key


def load_model_signing_key(path: Path) -> ec.EllipticCurvePrivateKey:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--signing-key {path} does not exist; a simulated run's key is made on its first export, a "
                          "deployed coordinator's by `fedistill coordinator init` (COORDINATOR_DIR/"
                          f"{MODEL_SIGNING_KEY_FILE}).")
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise ConfigError(f"--signing-key {path}: not an unencrypted PEM private key ({exc}).") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(key.curve, ec.SECP256R1):
        raise ConfigError(f"--signing-key {path}: the key is {type(key).__name__}"
                          f"{'/' + key.curve.name if isinstance(key, ec.EllipticCurvePrivateKey) else ''}; model "
                          "signing needs an EC P-256 (secp256r1) key.")
    return key


def create_node_key(private_path: Path) -> Path:
    """A site's SuperNode key pair in OpenSSH format; returns the path of the public half (``<name>.pub``)."""
    key = ec.generate_private_key(ec.SECP256R1())
    _write_private(private_path, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                                   serialization.NoEncryption()))
    public_path = private_path.with_name(private_path.name + ".pub")
    public_path.write_bytes(key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                          serialization.PublicFormat.OpenSSH) + b"\n")
    return public_path


def node_key_fingerprint(public_path: Path) -> str:
    """Check that ``public_path`` is an OpenSSH EC public key on a NIST curve; return its SHA256 fingerprint.

    The fingerprint is the one ``ssh-keygen -lf`` prints, so the operator and the site engineer can compare
    it over the phone before the key is registered.
    """
    if not public_path.is_file():
        raise ConfigError(f"public key file '{public_path}' does not exist.")
    text = public_path.read_bytes().strip()
    try:
        key = serialization.load_ssh_public_key(text)
    except (ValueError, TypeError) as err:
        raise ConfigError(f"'{public_path}' is not an OpenSSH public key ({err}); send the '.pub' file that "
                          "`fedistill site init` printed.") from None
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name not in {"secp256r1", "secp384r1",
                                                                                  "secp521r1"}:
        raise ConfigError(f"'{public_path}' is not an EC key on a NIST curve; Flower's SuperNode authentication "
                          "needs one (create it with `fedistill site init`).")
    blob = base64.b64decode(text.split()[1])
    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")


@dataclass(frozen=True)
class CertificateStatus:
    path: Path
    subject: str
    not_after: datetime
    days_left: float
    hosts: tuple[str, ...]


def check_certificate(path: Path, role: str, warn_days: int = EXPIRY_WARNING_DAYS) -> CertificateStatus:
    """Load a PEM certificate and refuse one that is not yet valid, expired, or expiring within ``warn_days``."""
    if not path.is_file():
        raise ConfigError(f"{role} '{path}' does not exist; ask the consortium operator for it.")
    try:
        certificate = x509.load_pem_x509_certificate(path.read_bytes())
    except ValueError as err:
        raise ConfigError(f"{role} '{path}' is not a PEM certificate ({err}).") from None
    now = datetime.now(UTC)
    days_left = (certificate.not_valid_after_utc - now).total_seconds() / 86400
    if certificate.not_valid_before_utc > now:
        raise ConfigError(f"{role} '{path}' is not valid before {certificate.not_valid_before_utc:%Y-%m-%d %H:%M} "
                          "UTC; check this machine's clock.")
    if days_left < 0:
        raise ConfigError(f"{role} '{path}' expired on {certificate.not_valid_after_utc:%Y-%m-%d}; ask the operator "
                          "for a new one.")
    if days_left < warn_days:
        raise ConfigError(f"{role} '{path}' expires in {days_left:.0f} day(s) (on "
                          f"{certificate.not_valid_after_utc:%Y-%m-%d}), within {warn_days}; ask the operator to renew "
                          "it before joining.")
    try:
        names = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        hosts = tuple(str(n.value) for n in names)
    except x509.ExtensionNotFound:
        hosts = ()
    return CertificateStatus(path, certificate.subject.rfc4514_string(), certificate.not_valid_after_utc, days_left,
                             hosts)


def certificate_fingerprint(path: Path) -> str:
    certificate = x509.load_pem_x509_certificate(path.read_bytes())
    return "SHA256:" + certificate.fingerprint(hashes.SHA256()).hex()
