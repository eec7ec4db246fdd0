""""Not assessed": the one marker of a field the run cannot evidence, with or without the reason why.

Kept apart from the report builder so that the sections derived from report.json alone (the summary, the crosswalk)
can recognise it without importing the builder.
"""

from __future__ import annotations

from typing import Any

NOT_ASSESSED = "not assessed"


def not_assessed(reason: str) -> str:
    """A field the run cannot evidence, with why: still recognised by :func:`is_not_assessed`."""
    return f"{NOT_ASSESSED}: {reason}"


def is_not_assessed(value: Any) -> bool:
    return isinstance(value, str) and (value == NOT_ASSESSED or value.startswith(NOT_ASSESSED + ": "))
