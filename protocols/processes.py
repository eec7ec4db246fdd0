"""Flower daemons started by fedistill (the coordinator's SuperLink, a site's SuperNode) and how they stop.

Both run in the foreground of a fedistill command, log to a file, and go down with everything they
started when the command gets SIGTERM or SIGINT.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
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
        self.stop()
        raise SystemExit(128 + signum)

    def running(self) -> bool:
        return self.process.poll() is None

    def wait(self) -> int:
        return self.process.wait()

    def stop(self) -> None:
        if self.process.poll() is not None:
            return
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
