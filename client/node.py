"""``fedistill site start``: the site's Flower SuperNode, dialling the coordinator over TLS with its node key."""

from __future__ import annotations

from pathlib import Path

from client.sitefile import SiteFile
from protocols.errors import ConfigError
from protocols.processes import Daemon, flower_environment, flower_script


def supernode_command(site: SiteFile) -> list[str]:
    """``--node-config`` hands the ClientApp only the site's state directory; everything else is in it."""
    state_dir = str(site.state_dir.resolve())
    if any(c.isspace() or c in "\"'=" for c in state_dir):
        raise ConfigError(f"[site] state_dir '{state_dir}' holds a space, quote or '='; Flower's --node-config cannot "
                          "carry it. Choose a plainer path.")
    return [flower_script("flower-supernode"), "--root-certificates", str(site.ca_certificate),
            "--superlink", site.coordinator_address, "--auth-supernode-private-key", str(site.node_key),
            "--node-config", f'state-dir="{state_dir}"', "--host", "127.0.0.1", "--port", str(site.runtime_port)]


def start_site(site: SiteFile) -> tuple[Daemon, Path]:
    """Refresh the state directory from site.toml, then start the SuperNode; its log goes to the state directory.

    Each site gets its own FLWR_HOME inside its state directory, so several sites can share one machine.
    """
    site.prepare_state()
    log_path = site.state_dir / "logs" / "supernode.log"
    daemon = Daemon(supernode_command(site), log_path, flower_environment(site.state_dir / "flwr-home"),
                    site.state_dir)
    return daemon, log_path


def failure_reason(log_path: Path) -> str:
    """The SuperNode's own explanation of why it stopped (Flower logs an exit code and a few lines after it)."""
    if not log_path.is_file():
        return ""
    lines = [line.strip() for line in log_path.read_text(errors="replace").splitlines() if line.strip()]
    starts = [i for i, line in enumerate(lines) if "Exit Code" in line]
    return " ".join(lines[starts[-1]:starts[-1] + 3]) if starts else ""
