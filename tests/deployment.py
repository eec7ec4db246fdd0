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


# A text (causal-LM) site: a tiny random Gemma 3 teacher with a word-level tokenizer (tests/test_causal_lm.py), a
# base student kept from two of its layers, and short documents written in that tokenizer's words.
TEXT_WORDS = ["the", "patient", "is", "well", "ill", "today"] + [f"w{i}" for i in range(20)]
TEXT_MAX_LENGTH = 12
BASE_LAYERS = (0, 2)


def documents_table(n: int, seed: int) -> pd.DataFrame:
    """``n`` short documents (1 to 15 words; every seventh is a single word, one is empty) in shuffled file order,
    with an ISO 8601 ``written_at`` column that orders them and a ``patient`` column."""
    rng = np.random.default_rng(seed)
    texts = [" ".join(rng.choice(TEXT_WORDS, size=1 if i % 7 == 3 else int(rng.integers(2, 16))))
             for i in range(n)]
    texts[5] = ""
    times = pd.date_range("2014-01-01", periods=n, freq="37h")
    order = rng.permutation(n)
    return pd.DataFrame({"note": [texts[i] for i in order],
                         "written_at": [times[i].strftime("%Y-%m-%dT%H:%M:%SZ") for i in order],
                         "patient": [f"p{int(rng.integers(0, n // 3))}" for _ in order]})


def write_causal_lm_teacher(directory: Path, seed: int = 0) -> Path:
    """A random 4-layer Gemma 3 causal LM with its word-level tokenizer, saved as a checkpoint folder."""
    import torch
    from transformers import AutoModelForCausalLM

    from distill.causal_lm import save_causal_lm_student
    from tests.test_causal_lm import tiny_config, tiny_tokenizer

    torch.manual_seed(seed)
    return save_causal_lm_student(AutoModelForCausalLM.from_config(tiny_config()).eval(), directory, tiny_tokenizer())


def write_base_student(teacher: Path, directory: Path) -> Path:
    """The run's base student as the consortium distributes it: layers BASE_LAYERS of the teacher, save_pretrained."""
    from distill.causal_lm import layer_subset_student, load_causal_lm_teacher, save_causal_lm_student

    loaded = load_causal_lm_teacher(teacher)
    return save_causal_lm_student(layer_subset_student(loaded.model, BASE_LAYERS), directory, loaded.tokenizer)


def fill_in_text_site(site_file: Path, address: str, runtime_port: int, max_length: int = TEXT_MAX_LENGTH,
                      order_by: str | None = "written_at", person_id: str | None = "patient") -> Path:
    """Fill in ``site init``'s template for a text site: notes.csv, teacher/, base-student/ beside site.toml."""
    text = site_file.read_text()
    data = ['text = "note"', f"max_length = {max_length}"] + ([f'order_by = "{order_by}"'] if order_by else [])
    for old, new in [('"FILL IN: host:port"', f'"{address}"'), ('"FILL IN: records.csv"', '"notes.csv"'),
                     ('"FILL IN: teacher.pkl"', '"teacher"'),
                     ('person_id = ""', f'person_id = "{person_id}"' if person_id else 'person_id = ""'),
                     ('"FILL IN: public, private-dp or private"', '"public"'),
                     ("runtime_port = 9094", f"runtime_port = {runtime_port}")]:
        assert old in text, old
        text = text.replace(old, new)
    # A text site has no label, classes or features; its base student is the folder the consortium sent.
    lines = []
    for line in text.splitlines():
        if line.startswith("label = "):
            lines += data
        elif not line.startswith(("classes = ", "features = ")):
            lines.append(line)
    site_file.write_text("\n".join(lines) + '\n\n[student]\nbase = "base-student"\n')
    return site_file


def make_text_site(root: Path, name: str, coordinator: Path, address: str, seed: int, runtime_port: int,
                   teacher: Path, base: Path, documents: int = 60) -> Path:
    """``site init``, then the text site's files (documents, teacher folder, base student folder, CA) and its
    filled-in site.toml; returns the site.toml path."""
    import shutil

    directory = root / name
    root.mkdir(parents=True, exist_ok=True)
    done = fedistill("site", "init", str(directory), "--name", name, cwd=root)
    assert done.returncode == 0, done.stderr
    documents_table(documents, seed).to_csv(directory / "notes.csv", index=False)
    shutil.copytree(teacher, directory / "teacher")
    shutil.copytree(base, directory / "base-student")
    (directory / "ca.crt").write_bytes((coordinator / "certs" / "ca.crt").read_bytes())
    return fill_in_text_site(directory / "site.toml", address, runtime_port)


CAUSAL_RUN_TOML = """\
schema_version = 1
coordinator = "coordinator"
out_dir = "runs"
wait_for_sites = 3
timeout_minutes = {minutes}

[federation]
rounds = 2
local_steps = 2
batch_size = 4
optimizer = "adam"
learning_rate = 0.003
target_epsilon = 8.0
max_grad_norm = 1.0
temperature_start = 1.0
temperature_end = 1.0

[federation.student]
family = "causal_lm"

[federation.student.settings]
base = "{base}"
base_digest = "{digest}"
top_k = 8
divergence = "forward_kl"
temperatures = [1.0]
max_length = {max_length}

[federation.student.settings.lora]
r = 4
alpha = 8
targets = ["q_proj", "v_proj"]
"""


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
