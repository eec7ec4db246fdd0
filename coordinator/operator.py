"""The consortium operator's coordinator directory: certificates, the site registry, the SuperLink process.

::

    <dir>/coordinator.json       hosts the sites dial, port, listen address, schema_version
    <dir>/certs/                 ca.crt (send to every site), ca.key, server.pem, server.key (0600)
    <dir>/coordinator_key.pem    the coordinator's Ed25519 key: it signs every run ledger (0600)
    <dir>/sites.json             the site registry: name, key fingerprint, key file, when added
    <dir>/sites/<name>.pub       each registered site's SuperNode public key
    <dir>/flwr-home/             the Flower CLI's connection to this coordinator (TLS, the CA above)
    <dir>/logs/                  the SuperLink's log
    <dir>/state.db               the SuperLink's state: registered nodes, runs
"""

from __future__ import annotations

import ipaddress
import json
import os
import shutil
import socket
import ssl
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from protocols.canonical import atomic_write_json
from protocols.fields import reject_unknown_fields
from protocols.errors import ConfigError, FedistillError
from protocols.ledger import generate_signing_key
from protocols.pki import (MODEL_SIGNING_KEY_FILE, check_certificate, certificate_fingerprint, create_certificates,
                           generate_model_signing_key, node_key_fingerprint)
from protocols.processes import Daemon, flower_environment, flower_script

SCHEMA_VERSION = 1
SETTINGS_FILE = "coordinator.json"
REGISTRY_FILE = "sites.json"
SIGNING_KEY_FILE = "coordinator_key.pem"
CONNECTION_NAME = "coordinator"
DEFAULT_PORT = 9092
STARTUP_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class CoordinatorDir:
    path: Path
    hosts: tuple[str, ...]
    port: int
    listen: str

    @property
    def ca_certificate(self) -> Path:
        return self.path / "certs" / "ca.crt"

    @property
    def signing_key(self) -> Path:
        return self.path / SIGNING_KEY_FILE

    @property
    def flwr_home(self) -> Path:
        return self.path / "flwr-home"

    @property
    def address(self) -> str:
        return f"{self.hosts[0]}:{self.port}"

    @property
    def pid_file(self) -> Path:
        return self.path / "superlink.pid"

    @classmethod
    def load(cls, path: Path) -> CoordinatorDir:
        path = Path(path).resolve()
        settings = path / SETTINGS_FILE
        if not settings.is_file():
            raise ConfigError(f"'{path}' is not a coordinator directory (no {SETTINGS_FILE}); create one with "
                              "`fedistill coordinator init DIR --host HOST`.")
        raw = json.loads(settings.read_text())
        if raw.get("schema_version") != SCHEMA_VERSION:
            raise ConfigError(f"{settings}: schema_version {raw.get('schema_version')!r} is not {SCHEMA_VERSION}.")
        reject_unknown_fields(raw, ("schema_version", "hosts", "port", "listen"), str(settings))
        return cls(path, tuple(raw["hosts"]), int(raw["port"]), str(raw["listen"]))

    def transport(self) -> dict[str, Any]:
        """What this coordinator enforces on every connection, as its operator's tooling attests it.

        ``coordinator start`` runs the SuperLink with exactly these certificates and with SuperNode
        authentication over exactly these registered keys; the run ledger records this at run start.
        """
        certs = self.path / "certs"
        server = check_certificate(certs / "server.pem", "the coordinator's server certificate", warn_days=0)
        return {
            "tls": {"server_certificate": certificate_fingerprint(certs / "server.pem"),
                    "ca_certificate": certificate_fingerprint(certs / "ca.crt"), "hosts": list(server.hosts),
                    "not_after": server.not_after.isoformat(timespec="seconds")},
            "supernode_authentication": True,
            "registered_sites": {name: {"fingerprint": entry["fingerprint"], "added_at": entry["added_at"]}
                                 for name, entry in sorted(self.registry().items())},
            "runtime_dependency_installation": False,
        }

    def registry(self) -> dict[str, dict[str, Any]]:
        path = self.path / REGISTRY_FILE
        raw = json.loads(path.read_text())
        if raw.get("schema_version") != SCHEMA_VERSION:
            raise ConfigError(f"{path}: schema_version {raw.get('schema_version')!r} is not {SCHEMA_VERSION}.")
        reject_unknown_fields(raw, ("schema_version", "sites"), str(path))
        return dict(raw["sites"])

    def write_connection(self) -> None:
        """The Flower CLI's connection to this SuperLink: over TLS, trusting only the consortium CA."""
        self.flwr_home.mkdir(parents=True, exist_ok=True)
        (self.flwr_home / "config.toml").write_text(
            f'[superlink]\ndefault = "{CONNECTION_NAME}"\n\n[superlink.{CONNECTION_NAME}]\n'
            f'address = "{self.address}"\nroot-certificates = "{self.ca_certificate}"\n')


def init_coordinator(path: Path, hosts: list[str], port: int = DEFAULT_PORT, listen: str | None = None,
                     organisation: str = "consortium") -> CoordinatorDir:
    path = Path(path).resolve()
    if (path / SETTINGS_FILE).exists():
        raise ConfigError(f"'{path}' is already a coordinator directory; use another directory or delete it first.")
    if not 0 < port < 65536:
        raise ConfigError(f"--port must be a port number, got {port}.")
    # Listen where the sites dial: on that IP if --host is one, else on every interface.
    if listen is None:
        try:
            listen = str(ipaddress.ip_address(hosts[0]))
        except (ValueError, IndexError):
            listen = "0.0.0.0"
    create_certificates(path / "certs", hosts, organisation)
    generate_signing_key(path / SIGNING_KEY_FILE)
    # The key that signs exported students (fedistill export --signing-key): P-256, which model signing takes.
    generate_model_signing_key(path / MODEL_SIGNING_KEY_FILE)
    atomic_write_json(path / REGISTRY_FILE, {"schema_version": SCHEMA_VERSION, "sites": {}})
    atomic_write_json(path / SETTINGS_FILE, {"schema_version": SCHEMA_VERSION, "hosts": hosts, "port": port,
                                             "listen": listen})
    (path / "logs").mkdir(exist_ok=True)
    coordinator = CoordinatorDir.load(path)
    coordinator.write_connection()
    return coordinator


def add_site(coordinator: CoordinatorDir, name: str, public_key: Path) -> dict[str, Any]:
    """Register a site's SuperNode key; if the SuperLink is running, the key is registered with it at once."""
    if not name.replace("-", "").replace("_", "").isalnum():
        raise ConfigError(f"site name may hold letters, digits, '-' and '_' only, got {name!r}.")
    fingerprint = node_key_fingerprint(Path(public_key))
    sites = coordinator.registry()
    if name in sites:
        raise ConfigError(f"site '{name}' is already registered (key {sites[name]['fingerprint']}).")
    clash = [other for other, entry in sites.items() if entry["fingerprint"] == fingerprint]
    if clash:
        raise ConfigError(f"this key is already registered for site '{clash[0]}'; each site needs its own key.")
    stored = coordinator.path / "sites" / f"{name}.pub"
    stored.parent.mkdir(exist_ok=True)
    shutil.copyfile(public_key, stored)
    entry = {"public_key": str(stored.relative_to(coordinator.path)), "fingerprint": fingerprint,
             "added_at": datetime.now(UTC).isoformat(timespec="seconds")}
    atomic_write_json(coordinator.path / REGISTRY_FILE, {"schema_version": SCHEMA_VERSION,
                                                         "sites": sites | {name: entry}})
    if running_pid(coordinator) is not None:
        register_with_superlink(coordinator, name, stored)
    return entry


def running_pid(coordinator: CoordinatorDir) -> int | None:
    if not coordinator.pid_file.is_file():
        return None
    pid = int(coordinator.pid_file.read_text().strip())
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    return pid


def flwr(coordinator: CoordinatorDir, *args: str, timeout: float = 120.0) -> dict[str, Any]:
    """Run the Flower CLI against this coordinator with ``--format json`` and return its parsed answer."""
    command = [flower_script("flwr"), *args, CONNECTION_NAME, "--format", "json"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout,
                          env=flower_environment(coordinator.flwr_home))
    try:
        return json.loads(done.stdout)
    except json.JSONDecodeError:
        raise FedistillError(f"`flwr {' '.join(args)}` did not answer in JSON (exit {done.returncode}): "
                             f"{(done.stdout + done.stderr).strip()[-800:]}") from None


def register_with_superlink(coordinator: CoordinatorDir, name: str, public_key: Path) -> None:
    """Register a site's key with the running SuperLink and remember the node id Flower gave it."""
    answer = flwr(coordinator, "supernode", "register", str(public_key), "--name", name)
    if answer.get("success"):
        sites = coordinator.registry()
        sites[name] = sites[name] | {"node_id": str(answer["node-id"])}
        atomic_write_json(coordinator.path / REGISTRY_FILE, {"schema_version": SCHEMA_VERSION, "sites": sites})
    elif "already in use" not in str(answer.get("error-message", "")):
        raise FedistillError(f"the SuperLink refused site '{name}''s key: {answer.get('error-message')}")


def register_sites(coordinator: CoordinatorDir) -> None:
    """Register every site of the registry the SuperLink does not know yet.

    The SuperLink keeps registrations in its database, so after a restart only new sites (or all of them,
    if the database was lost) are registered.
    """
    listed = flwr(coordinator, "supernode", "list")
    known = {str(node["node-id"]) for node in listed.get("nodes", []) if node.get("status") != "unregistered"}
    for name, entry in coordinator.registry().items():
        if entry.get("node_id") not in known:
            register_with_superlink(coordinator, name, coordinator.path / entry["public_key"])


def _wait_for_tls(host: str, port: int, ca: Path, daemon: Daemon) -> None:
    context = ssl.create_default_context(cafile=str(ca))
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    log_path = daemon.log_path
    while time.monotonic() < deadline:
        if not daemon.running():
            raise FedistillError(f"the SuperLink exited with code {daemon.wait()} while starting; see {log_path}.")
        try:
            with socket.create_connection((host, port), timeout=2) as raw:
                with context.wrap_socket(raw, server_hostname=host):
                    return
        except OSError:
            time.sleep(0.5)
    raise FedistillError(f"the SuperLink did not accept TLS connections on {host}:{port} within "
                         f"{STARTUP_TIMEOUT_S:.0f} s; see {log_path}.")


def superlink_command(coordinator: CoordinatorDir) -> list[str]:
    certs = coordinator.path / "certs"
    return [flower_script("flower-superlink"),
            "--ssl-ca-certfile", str(certs / "ca.crt"), "--ssl-certfile", str(certs / "server.pem"),
            "--ssl-keyfile", str(certs / "server.key"), "--enable-supernode-auth",
            "--database", str(coordinator.path / "state.db"), "--disable-runtime-dependency-installation",
            "--host", coordinator.listen, "--port", str(coordinator.port),
            "--log-file", str(coordinator.path / "logs" / "superlink.log")]


def start_coordinator(coordinator: CoordinatorDir, on_ready: Callable[[CoordinatorDir], None] | None = None) -> int:
    """Run the SuperLink in the foreground until SIGTERM or SIGINT, then stop it and everything it started.

    Once it accepts TLS connections, every site in the registry is registered with it, and ``on_ready`` is
    called.
    """
    if running_pid(coordinator) is not None:
        raise FedistillError(f"a coordinator from {coordinator.path} is already running (pid "
                             f"{running_pid(coordinator)}); stop it first.")
    coordinator.write_connection()
    daemon = Daemon(superlink_command(coordinator), coordinator.path / "logs" / "superlink.out",
                    flower_environment(coordinator.flwr_home), coordinator.path)
    coordinator.pid_file.write_text(f"{os.getpid()}\n")
    try:
        dial = "127.0.0.1" if coordinator.listen in ("0.0.0.0", "::") else coordinator.listen
        _wait_for_tls(dial, coordinator.port, coordinator.ca_certificate, daemon)
        register_sites(coordinator)
        if on_ready is not None:
            on_ready(coordinator)
        return daemon.wait()
    finally:
        daemon.stop()
        coordinator.pid_file.unlink(missing_ok=True)
