"""``--from RUN_DIR``: a run that continues a finished run starts from its student, once that run verifies.

The earlier run is checked the way an auditor would check it (compliance.verify): its ledgers, signatures, rounds,
sites' privacy and its final student's digest. Only a verified, finished run can be continued. What the new run
starts from (the earlier run's id, config hash, final student digest and ledger head) goes into the new run's
config (``continues``, protocols/curriculum.py), so its hash, which every site checks, and the new run's signed
ledger both name it. The sites keep their own lifetime accounts across runs, so the budgets compose by themselves.
"""

from __future__ import annotations

import json
from pathlib import Path

from safetensors.numpy import load_file

from compliance.verify import VERIFIED, verify_run
from protocols.canonical import digest_arrays
from protocols.config import StudentSpec
from protocols.curriculum import Continuation
from protocols.errors import ConfigError, LedgerTampered
from protocols.ledger import read_events


def continuation_of(run_dir: Path, student: StudentSpec) -> Continuation:
    """The record a continuing run's config carries; its student is ``RUN_DIR/student/model.safetensors``."""
    run_dir = Path(run_dir)
    if not (run_dir / "ledger.jsonl").is_file():
        raise ConfigError(f"--from {run_dir}: no run ledger there; name the directory of a finished run (it holds "
                          "ledger.jsonl, config.json and student/).")
    try:
        audit = verify_run(run_dir, check_report=False)
    except LedgerTampered as err:
        raise LedgerTampered(f"--from {run_dir}: that run does not verify, so nothing can continue from it: {err}") \
            from None
    if audit.status != VERIFIED:
        raise ConfigError(f"--from {run_dir}: that run is {audit.status} ({'; '.join(audit.incomplete)}); resume it "
                          "until it finishes, then continue from it.")
    prior = json.loads((run_dir / "config.json").read_text())["federation"]
    if StudentSpec.from_dict(prior["student"]) != student:
        raise ConfigError(f"--from {run_dir}: that run's student is {prior['student']}, this run's is "
                          f"{student.to_dict()}; a run continues only the same student.")
    events = read_events(run_dir / "ledger.jsonl")
    finished = [e["payload"] for e in events if e["kind"] == "run-finished"][-1]
    if digest_arrays(load_file(str(run_dir / "student" / "model.safetensors"))) != finished["student_digest"]:  # verify_run checked it; the file may change since
        raise LedgerTampered(f"--from {run_dir}: student/model.safetensors changed after it verified.")
    return Continuation(run_id=finished["run_id"], config_hash=finished["config_hash"],
                        student_digest=finished["student_digest"], ledger_head=events[-1]["hash"])
