"""Every site's answer is screened here before it can touch anything: one bad reply is one named rejection.

Nothing a site sends is trusted. A reply is accepted only if it echoes this round's binding (run id, round,
nonce), comes from a site that answers once, carries exactly the student's tensors (names, shapes, dtypes,
finite values), changes no fragment by more than ``max_update_norm`` (L2), states finite, in-range metrics and a
well-formed privacy report, and reports a ledger head past the one the site reported before. Any exception raised
while checking one reply becomes that reply's rejection; the other replies go on to be aggregated.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from protocols.errors import UpdateRejected
from protocols.fragments import FragmentSpec
from protocols.messages import (PLAIN_PRIVACY_FIELDS, PUBLIC_PRIVACY_FIELDS, TrainInstruction, check_binding,
                                check_fragment_update, check_privacy_report, check_site_name, check_train_metrics,
                                fragment_change_norms)

log = logging.getLogger("fedistill.coordinator")
MAX_REASON = 600


@dataclass(frozen=True)
class SiteReply:
    """One site's plain reply as it came off the wire; nothing in it is trusted before :func:`screen_replies`."""

    site: Any
    arrays: Mapping[str, Any]
    num_examples: Any
    train_loss: Any
    privacy: Mapping[str, Any] = field(default_factory=dict)
    binding: Mapping[str, Any] = field(default_factory=dict)
    source: str = ""


@dataclass(frozen=True)
class QueryAnswer:
    """A site's answer to "will you train this round?": ``accept`` or ``refusal`` (with the site's reason)."""

    source: str
    site: Any
    kind: str
    binding: Mapping[str, Any]
    reason: Any = ""


@dataclass
class Screened:
    """The replies that may be used, and a reason for every one that may not (keyed by site, or by source)."""

    accepted: list[Any] = field(default_factory=list)
    rejected: dict[str, str] = field(default_factory=dict)


def safe_text(text: Any, limit: int = MAX_REASON) -> str:
    """A site-controlled string made safe for logs and the ledger: valid UTF-8, bounded, no control characters."""
    cleaned = str(text).encode("utf-8", "backslashreplace").decode("utf-8")
    cleaned = "".join(ch if ch.isprintable() else "?" for ch in cleaned)
    return cleaned if len(cleaned) <= limit else cleaned[: limit - 3] + "..."


def _label(site: Any, source: str) -> str:
    try:
        return check_site_name(site, "")
    except UpdateRejected:
        return f"unnamed reply from {safe_text(source or 'an unknown node', 80)}"


def _reject(screened: Screened, key: str, reason: Any, server_round: int) -> None:
    reason = safe_text(reason)
    screened.rejected[key] = reason
    log.warning("round %d: rejected the reply of %s: %s", server_round, key, reason)


def _duplicates(names: Sequence[Any]) -> set[str]:
    counts = Counter(name for name in names if isinstance(name, str))
    return {name for name, count in counts.items() if count > 1}


def screen_query_answers(answers: Sequence[QueryAnswer], instruction: TrainInstruction
                         ) -> tuple[dict[str, str], dict[str, str], dict[str, str]]:
    """(accepted: source -> site, refusals: site -> reason, rejected: site or source -> reason).

    A site that answers from two nodes is excluded from the round altogether: which one is genuine is unknown.
    """
    accepted, refusals = {}, {}
    screened = Screened()
    twice = _duplicates([a.site for a in answers])
    for answer in answers:
        what = f"round {instruction.server_round} answer of {_label(answer.site, answer.source)}"
        try:
            site = check_site_name(answer.site, what)
            if site in twice:
                raise UpdateRejected(f"{what}: site {site} answered more than once this round; all of its answers "
                                     "are rejected.")
            check_binding(answer.binding, instruction, what)
            if answer.kind == "accept":
                accepted[answer.source] = site
            elif answer.kind == "refusal":
                refusals[site] = safe_text(answer.reason)
                log.warning("round %d: %s refused: %s", instruction.server_round, site, refusals[site])
            else:
                raise UpdateRejected(f"{what}: neither an acceptance nor a refusal.")
        except Exception as err:  # any malformed answer is that answer's rejection, never the round's end
            _reject(screened, _label(answer.site, answer.source), err, instruction.server_round)
    return accepted, refusals, screened.rejected


def _check_plain_reply(reply: SiteReply, instruction: TrainInstruction, global_state: Mapping[str, np.ndarray],
                       spec: FragmentSpec, last_seq: Mapping[str, int], expected_site: str | None) -> SiteReply:
    what = f"round {instruction.server_round} update from {_label(reply.site, reply.source)}"
    site = check_site_name(reply.site, what)
    if expected_site is not None and site != expected_site:
        raise UpdateRejected(f"{what}: it comes from the node that answered as {expected_site}.")
    check_binding(reply.binding, instruction, what)
    num_examples, train_loss = check_train_metrics(reply.num_examples, reply.train_loss, what)
    privacy = check_privacy_report(reply.privacy, PLAIN_PRIVACY_FIELDS, what)
    _check_ledger_advances(privacy, site, last_seq, what)
    check_fragment_update(reply.arrays, spec, instruction.fragments, global_state, what)
    _check_norms(fragment_change_norms(reply.arrays, global_state, spec, instruction.fragments),
                 instruction.max_update_norm, what)
    return SiteReply(site, dict(reply.arrays), num_examples, train_loss, privacy, dict(reply.binding), reply.source)


def _check_ledger_advances(privacy: Mapping[str, Any], site: str, last_seq: Mapping[str, int], what: str) -> None:
    previous = last_seq.get(site, -1)
    if privacy["ledger-seq"] <= previous:
        raise UpdateRejected(f"{what}: its ledger head {privacy['ledger-seq']} does not advance past {previous}, the "
                             "one it reported before (a replayed reply, or a rewritten site ledger).")


def _check_norms(norms: Mapping[str, float], bound: float, what: str) -> None:
    for fragment, norm in norms.items():
        if not norm <= bound:
            raise UpdateRejected(f"{what}: its change to fragment '{fragment}' has L2 norm {norm:.4g}, above the "
                                 f"bound max_update_norm={bound:g}.")


def screen_replies(replies: Sequence[SiteReply], instruction: TrainInstruction, global_state: Mapping[str, np.ndarray],
                   spec: FragmentSpec, last_seq: Mapping[str, int],
                   expected_sites: Mapping[str, str] | None = None) -> Screened:
    """Plain mode: every reply checked on its own; ``expected_sites`` maps a source to the site it answered as."""
    screened = Screened()
    twice = _duplicates([r.site for r in replies])
    for reply in replies:
        label = _label(reply.site, reply.source)
        if label in twice:
            _reject(screened, label, f"round {instruction.server_round}: site {label} sent more than one update; "
                                     "all of them are rejected.", instruction.server_round)
            continue
        try:
            expected = None if expected_sites is None else expected_sites.get(reply.source, "a node that never accepted")
            screened.accepted.append(_check_plain_reply(reply, instruction, global_state, spec, last_seq, expected))
        except Exception as err:  # any malformed reply is that reply's rejection, never the round's end
            _reject(screened, label, err, instruction.server_round)
    screened.accepted.sort(key=lambda r: r.site)
    return screened


def check_secure_report(report: Mapping[str, Any], expected_site: str, instruction: TrainInstruction,
                        last_seq: Mapping[str, int]) -> dict[str, Any]:
    """SecAgg+: the clear metadata beside a masked vector (site, binding, public privacy report), or UpdateRejected."""
    what = f"round {instruction.server_round} masked update from {expected_site}"
    fields = dict(report)
    site = check_site_name(fields.pop("site", None), what)
    if site != expected_site:
        raise UpdateRejected(f"{what}: its metadata names site {safe_text(site, 80)}.")
    check_binding({key: fields.pop(key) for key in instruction.binding() if key in fields}, instruction, what)
    privacy = check_privacy_report(fields, PUBLIC_PRIVACY_FIELDS, what)
    _check_ledger_advances(privacy, site, last_seq, what)
    return privacy
