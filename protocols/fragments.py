"""Fragments: named, disjoint groups of a student's parameters, and the plans that pick them per round.

A fragment spec is derived from parameter names alone (no torch needed), so the coordinator and the
sites compute the same spec from the same student. Within one aggregation group every site trains the
same fragments in a round, the fixed tensor layout that secure aggregation needs.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from protocols.config import FRAGMENT_PLANS
from protocols.errors import ConfigError, UpdateRejected

_TRANSFORMER_BLOCK = re.compile(r"^(.*?\.layers?\.\d+)\.")


@dataclass(frozen=True)
class FragmentSpec:
    """Ordered fragments, bottom (input side) first; each parameter belongs to exactly one."""

    fragments: tuple[tuple[str, tuple[str, ...]], ...]

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.fragments)

    def parameters_of(self, fragment: str) -> tuple[str, ...]:
        for name, params in self.fragments:
            if name == fragment:
                return params
        raise UpdateRejected(f"unknown fragment '{fragment}'; this student has fragments: {', '.join(self.names)}.")

    def parameters_of_all(self, fragments: Iterable[str]) -> tuple[str, ...]:
        return tuple(p for fragment in fragments for p in self.parameters_of(fragment))

    def restricted_to(self, fragments: Sequence[str]) -> FragmentSpec:
        """Only the named fragments, in this spec's order (a curriculum stage's; empty: all of them)."""
        if not fragments:
            return self
        unknown = [f for f in fragments if f not in self.names]
        if unknown:
            raise ConfigError(f"curriculum: stage fragments {unknown} are not fragments of this student; its "
                              f"fragments are {', '.join(self.names)}.")
        return FragmentSpec(tuple((name, params) for name, params in self.fragments if name in fragments))

    def to_dict(self) -> dict[str, list[str]]:
        return {name: list(params) for name, params in self.fragments}


def _group_in_order(parameter_names: Sequence[str], key) -> FragmentSpec:
    groups: dict[str, list[str]] = {}
    for name in parameter_names:
        groups.setdefault(key(name), []).append(name)
    return FragmentSpec(tuple((k, tuple(v)) for k, v in groups.items()))


def _module_path(parameter: str) -> str:
    return parameter.rsplit(".", 1)[0] if "." in parameter else parameter


def per_block(parameter_names: Sequence[str]) -> FragmentSpec:
    """Transformer students: one fragment per encoder block, plus embeddings, pooler and head."""

    def key(name: str) -> str:
        match = _TRANSFORMER_BLOCK.match(name)
        if match:
            return match.group(1)
        return ".".join(_module_path(name).split(".")[:2])

    return _group_in_order(parameter_names, key)


def per_layer(parameter_names: Sequence[str]) -> FragmentSpec:
    """Small networks: one fragment per layer (the module that owns the weight and bias)."""
    return _group_in_order(parameter_names, _module_path)


def from_patterns(parameter_names: Sequence[str], patterns: Sequence[tuple[str, Sequence[str]]]) -> FragmentSpec:
    """Explicit fragments from glob patterns; a parameter matched by none or by two is an error."""
    owner: dict[str, str] = {}
    for parameter in parameter_names:
        matches = [name for name, globs in patterns if any(fnmatch.fnmatchcase(parameter, g) for g in globs)]
        if not matches:
            raise ConfigError(f"fragment_patterns: parameter '{parameter}' matches no fragment; add a pattern for it.")
        if len(matches) > 1:
            raise ConfigError(f"fragment_patterns: parameter '{parameter}' matches fragments {matches}; "
                              "each parameter must belong to exactly one fragment.")
        owner[parameter] = matches[0]
    empty = [name for name, _ in patterns if name not in owner.values()]
    if empty:
        raise ConfigError(f"fragment_patterns: fragment(s) {empty} match no parameter; remove them or fix the patterns.")
    order = [name for name, _ in patterns]
    return FragmentSpec(tuple((name, tuple(p for p in parameter_names if owner[p] == name)) for name in order))


def fragment_spec_for(family: str, parameter_names: Sequence[str],
                      patterns: Sequence[tuple[str, Sequence[str]]] = ()) -> FragmentSpec:
    if patterns:
        return from_patterns(parameter_names, patterns)
    return per_block(parameter_names) if family in ("bert", "causal_lm") else per_layer(parameter_names)


def planned_fragments(plan: str, spec: FragmentSpec, server_round: int, total_rounds: int) -> tuple[str, ...]:
    """Which fragments every site of the group trains in round ``server_round`` (1-based).

    ``all``: every fragment, every round. ``cyclic``: one fragment per round, in turn.
    ``progressive``: the rounds are split into as many stages as there are fragments, and stage k
    trains the bottom k+1 fragments, so lower layers settle before upper ones join.
    """
    if plan not in FRAGMENT_PLANS:
        raise ConfigError(f"fragment_plan must be one of {', '.join(FRAGMENT_PLANS)}, got {plan!r}.")
    if not 1 <= server_round <= total_rounds:
        raise ConfigError(f"round {server_round} is outside 1..{total_rounds}.")
    names = spec.names
    if plan == "all":
        return names
    if plan == "cyclic":
        return (names[(server_round - 1) % len(names)],)
    stage = min(len(names) - 1, (server_round - 1) * len(names) // total_rounds)
    return names[: stage + 1]


def stage_parameters(family: str, parameter_names: Sequence[str], fragments: Sequence[str],
                     patterns: Sequence[tuple[str, Sequence[str]]] = ()) -> list[str] | None:
    """The parameter names a curriculum stage trains: those of its named fragments (None: every parameter)."""
    if not fragments:
        return None
    return list(fragment_spec_for(family, parameter_names, patterns).restricted_to(fragments).parameters_of_all(fragments))
