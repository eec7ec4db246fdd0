"""A site's copy of the run's preprocessing (distill/preprocessing.py), and the pin every round checks.

A bank site turns its raw table (categorical columns, raw amounts) into the teacher's features with the preprocessor
file the consortium operator ships (site.toml ``[data] preprocessor``); its state directory keeps a copy
(``PREPROCESSOR_FILE``), as every simulated site's does. A run pins the file by SHA-256
(``FederationConfig.preprocessing_digest``, sent with every instruction). A site whose features were made by another
file, or by one while the run pins none (or by none while the run pins one), would train the run's student on inputs
it was never built for: it refuses the run before it trains or spends anything.
"""

from __future__ import annotations

from pathlib import Path

from client.site import Site
from distill.preprocessing import PREPROCESSOR_FILE
from protocols.canonical import file_sha256
from protocols.errors import UpdateRejected
from protocols.messages import TrainInstruction


def preprocessor_digest(state_dir: Path) -> str | None:
    """The SHA-256 of the site's copy of its preprocessor; None: the site's records need no preprocessing."""
    path = Path(state_dir) / PREPROCESSOR_FILE
    return file_sha256(path) if path.is_file() else None


def preprocessing_mismatch(site_digest: str | None, run_digest: str | None) -> str | None:
    """What is wrong, and what to do, when the site's preprocessor is not the one the run pins; None: they agree."""
    if site_digest == run_digest:
        return None
    if run_digest is None:
        return (f"this site's features are made by its preprocessor (SHA-256 {site_digest}, [data] preprocessor), "
                "but the run pins no preprocessing_digest: it expects features the sites prepared without shared "
                "preprocessing. Ask the operator whether the run should pin preprocessing_digest = "
                f"\"{site_digest}\", or remove [data] preprocessor and list the run's [data] features")
    if site_digest is None:
        return (f"the run pins preprocessing_digest {run_digest}, but this site has no preprocessor: set [data] "
                "preprocessor in site.toml to the file the operator shipped with the run (of that SHA-256) and "
                "remove [data] features")
    return (f"this site's preprocessor has SHA-256 {site_digest}, but the run pins preprocessing_digest "
            f"{run_digest}: its features are not the ones the run's teacher and student read. Set [data] "
            "preprocessor to the file the operator shipped with this run")


def check_preprocessing(site: Site, instruction: TrainInstruction) -> None:
    """Refuse a run whose pinned preprocessing is not the site's own, before anything is trained or recorded."""
    problem = preprocessing_mismatch(preprocessor_digest(site.state_dir), instruction.preprocessing_digest)
    if problem is not None:
        raise UpdateRejected(f"site {site.name} refuses round {instruction.server_round} of run {instruction.run_id}: "
                             f"{problem}; then run `fedistill site start` again, which copies it into the state "
                             "directory. Nothing was trained or spent.")
