"""Fail-closed field checks for every file fedistill reads: an unknown or misspelt field is an error, never ignored.

A misspelt cap (``epsilon_per_rnu``) that were silently dropped would leave a site with no cap at all, so every
reader names the unknown field and suggests the nearest valid one.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Mapping
from typing import Any

from protocols.errors import ConfigError


def unknown_field_message(unknown: str, known: Iterable[str]) -> str:
    """``'epsilon_per_rnu'`` (did you mean 'epsilon_per_run'?) or the list of valid names."""
    known = sorted(known)
    nearest = difflib.get_close_matches(unknown, known, n=1, cutoff=0.6)
    hint = f"did you mean '{nearest[0]}'?" if nearest else f"valid fields are {', '.join(known)}"
    return f"unknown field '{unknown}' ({hint})"


def reject_unknown_fields(raw: Mapping[str, Any], known: Iterable[str], where: str) -> None:
    """Raise ConfigError naming every field of ``raw`` not in ``known``, each with the nearest valid name."""
    known = set(known)
    unknown = sorted(str(key) for key in raw if key not in known)
    if unknown:
        problems = "; ".join(unknown_field_message(name, known) for name in unknown)
        raise ConfigError(f"{where}: {problems}. Fix the spelling or remove the field; nothing was run.")
