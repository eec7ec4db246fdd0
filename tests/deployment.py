"""Deployment fixtures: a coordinator directory and sites set up through the CLI, as the docs tell users to.

Every process a test starts goes through :class:`Processes`, which stops them all (whole process trees)
when the test ends, whatever happened.
"""

from __future__ import annotations

import os
import pickle
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.linear_model import LogisticRegression

from protocols.processes import process_tree

FEATURES = [f"f{i}" for i in range(5)]
FEDISTILL = [sys.executable, "-m", "fedistill"]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def records_table(n: int, seed: int) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, len(FEATURES)))
    y = x[:, 0] + 0.5 * x[:, 1] + 0.5 * rng.normal(size=n) > 0
    frame = pd.DataFrame(x, columns=FEATURES)
    frame["outcome"] = np.where(y, "positive", "negative")
    frame["patient"] = rng.integers(0, n // 2, n)
    return frame


def fedistill(*args: str, cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([*FEDISTILL, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout)


def make_site(root: Path, name: str, coordinator: Path, address: str, seed: int, runtime_port: int) -> Path:
    """``site init``, then fill in site.toml the way a site engineer would; returns the site.toml path."""
    directory = root / name
    done = fedistill("site", "init", str(directory), "--name", name, cwd=root)
    assert done.returncode == 0, done.stderr
    records_table(240 + 40 * seed, seed).to_csv(directory / "records.csv", index=False)
    public = records_table(600, 99)
    teacher = LogisticRegression().fit(public[FEATURES].to_numpy(), public["outcome"] == "positive")
    (directory / "teacher.pkl").write_bytes(pickle.dumps(teacher))
    (directory / "ca.crt").write_bytes((coordinator / "certs" / "ca.crt").read_bytes())
    site_file = directory / "site.toml"
    text = site_file.read_text()
    for old, new in [('"FILL IN: host:port"', f'"{address}"'), ('"FILL IN: records.csv"', '"records.csv"'),
                     ('label = "FILL IN"', 'label = "outcome"'),
                     ('features = ["FILL IN"]', f"features = {FEATURES!r}".replace("'", '"')),
                     ('person_id = ""', 'person_id = "patient"'), ('"FILL IN: teacher.pkl"', '"teacher.pkl"'),
                     # The teacher is fitted on records_table(600, 99), never on the site's own records.
                     ('"FILL IN: public, private-dp or private"', '"public"'),
                     ("runtime_port = 9094", f"runtime_port = {runtime_port}")]:
        assert old in text, old
        text = text.replace(old, new)
    site_file.write_text(text)
    return site_file


RUN_TOML = """\
schema_version = 1
coordinator = "coordinator"
out_dir = "runs"
wait_for_sites = 3
timeout_minutes = {minutes}

[federation]
rounds = 2
local_steps = 4
batch_size = 32
learning_rate = 0.3
target_epsilon = 6.0
max_grad_norm = 0.5

[federation.student]
family = "mlp"
settings = {{ input_dim = 5, hidden = [16], num_classes = 2 }}
"""


class Processes:
    """Long-running CLI processes of one test, each logging to a file; ``stop_all`` ends every one of them."""

    def __init__(self, logs: Path) -> None:
        self.logs = logs
        self.started: dict[str, subprocess.Popen] = {}
        logs.mkdir(parents=True, exist_ok=True)

    def start(self, name: str, *args: str, cwd: Path) -> subprocess.Popen:
        with open(self.logs / f"{name}.log", "ab") as log:
            process = subprocess.Popen([*FEDISTILL, *args], cwd=cwd, stdout=log, stderr=subprocess.STDOUT,
                                       start_new_session=True)
        self.started[name] = process
        return process

    def log(self, name: str) -> str:
        return (self.logs / f"{name}.log").read_text(errors="replace")

    def wait_for_log(self, name: str, text: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.log(name):
            if self.started[name].poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"'{text}' not in the log of {name} after {timeout:.0f} s:\n{self.log(name)}")
            time.sleep(0.5)

    def crash(self, name: str) -> None:
        """SIGKILL the process and everything below it: no handler runs, as in a power cut."""
        for pid in process_tree(self.started[name].pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.started[name].wait(timeout=30)

    def stop(self, name: str, timeout: float = 60) -> int:
        process = self.started[name]
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.crash(name)
        return process.returncode

    def stop_all(self) -> None:
        for name in list(self.started):
            self.stop(name)
