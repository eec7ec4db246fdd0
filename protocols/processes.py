"""Flower daemons started by fedistill (the coordinator's SuperLink, a site's SuperNode) and how they stop.

Both run in the foreground of a fedistill command, log to a file, and go down with everything they
started when the command gets SIGTERM or SIGINT.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

STOP_GRACE_S = 15.0


def flower_script(name: str) -> str:
    """A Flower console script of this Python environment (``flwr``, ``flower-superlink`` ...)."""
    return str(Path(sys.executable).parent / name)


def flower_environment(flwr_home: Path) -> dict[str, str]:
    """The environment of every Flower process fedistill starts: its own FLWR_HOME, no runtime installs.

    Flower's daemons start their helpers (``flower-superexec``, ``flwr-clientapp``) by name, so the folder
    of this Python's scripts goes first on PATH.
    """
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.update({"FLWR_HOME": str(flwr_home), "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1",
                "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1", "HF_HUB_OFFLINE": "1",
                "TRANSFORMERS_OFFLINE": "1"})
    return env


class Daemon:
    """A child process in its own process group, logging to ``log_path``; ``stop`` ends the whole group."""

    def __init__(self, command: list[str], log_path: Path, env: dict[str, str], cwd: Path) -> None:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self.log_path = log_path
        with open(log_path, "ab") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=cwd,
                                            start_new_session=True)
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)

    def _on_signal(self, signum: int, _frame: Any) -> None:
        # Only unwind here: the caller's ``finally`` stops the daemon. Stopping inside the handler would wait
        # on the child while the interrupted wait still holds Popen's lock, and hang.
        raise SystemExit(128 + signum)

    def running(self) -> bool:
        return self.process.poll() is None

    def wait(self) -> int:
        return self.process.wait()

    def stop(self) -> None:
        """SIGTERM to the daemon and every process below it, SIGKILL to whatever is left after a grace period.

        Flower's SuperLink starts its SuperExec in a session of its own, so the process group alone is not
        enough: the whole tree is collected before anything is signalled.
        """
        if self.process.poll() is not None:
            return
        tree = process_tree(self.process.pid)
        _signal_all(tree, signal.SIGTERM)
        try:
            self.process.wait(timeout=STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            pass
        deadline = time.monotonic() + STOP_GRACE_S
        while time.monotonic() < deadline and any(_alive(pid) for pid in tree[1:]):
            time.sleep(0.2)
        _signal_all([pid for pid in tree if _alive(pid)], signal.SIGKILL)
        self.process.wait()


def process_tree(root: int) -> list[int]:
    """``root`` and all its descendants, parents first (read from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        parent = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(parent, []).append(int(entry.name))
    tree = [root]
    for pid in tree:
        tree.extend(children.get(pid, []))
    return tree


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie has exited; only its parent's wait is missing.
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _signal_all(pids: list[int], signum: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            pass
