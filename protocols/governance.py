"""What only people know about a run: who the parties are, what the model is for, which regimes apply, and each
site's records of processing. Parsed once at the boundary into frozen dataclasses.

Two files carry it (docs/deploy.md, "Parties and governance"):

- ``parties.toml``, the operator's: the intended use, the legal entity, role, privacy officer and jurisdiction of the
  coordinator and of each site, the agreements between them and the regimes the federation declares. It is given to
  ``fedistill simulate --parties FILE`` or named in run.toml (``parties``), and the coordinator records it in its
  signed ledger at run start (a ``parties-declared`` event with the parsed content and its digest).
- a ``[governance]`` table in each site's ``site.toml`` (lawful basis, categories of subjects and data,
  de-identification, erasure schedule), which the site records in its signed ``run-accepted`` event. A simulation
  takes the same tables from ``fedistill simulate --site-governance FILE`` (one ``[governance.SITE]`` per site).

The report reads both only from the ledgers (the evidence), never from a loose file. Every field is optional: what
a file does not state stays "not assessed" in the report. What it does state is checked: an unknown field, a value
of the wrong type, an empty string or a left-over ``FILL IN`` is a :class:`ConfigError` naming the file and field.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from protocols.canonical import digest_json, file_sha256
from protocols.config import load_versioned_toml
from protocols.errors import ConfigError
from protocols.fields import reject_unknown_fields

SCHEMA_VERSION = 1
PARTIES_EVENT = "parties-declared"
# A party's roles under the regimes it takes part in (GDPR Art. 4(7)-(8) and 26, HIPAA 160.103, AI Act Art. 3(3)-(4),
# GLBA 314.2): a hospital can be a covered entity and a joint controller at once.
ROLES = ("controller", "joint controller", "processor", "covered entity", "business associate", "provider",
         "deployer", "financial institution", "service provider")
# The regimes a federation may declare, keyed as parties.toml's [regimes.KEY] tables, with their display names.
REGIMES = {"hipaa": "HIPAA", "gdpr": "GDPR", "eu_ai_act": "EU AI Act", "sr_11_7": "SR 11-7",
           "glba": "GLBA Safeguards Rule"}
# What each regime's table may say beyond its presence (the crosswalk reads these; all optional but eu_ai_act's).
REGIME_FIELDS: dict[str, tuple[str, ...]] = {
    "hipaa": ("notes",), "gdpr": ("notes",),
    "eu_ai_act": ("role", "use_case", "notes"),
    "sr_11_7": ("model_owner", "risk_tier", "inventory_id", "independent_validator", "notes"),
    "glba": ("qualified_individual", "notes"),
}
# The AI Act's risk class follows from the use: credit scoring of natural persons is high-risk (Annex III point
# 5(b)); a model that is (a safety component of) a medical device under the MDR/IVDR is high-risk through Art. 6(1)
# and Annex I; any other use is not high-risk on this declaration.
AI_ACT_ROLES = ("provider", "deployer")
AI_ACT_USE_CASES = ("credit-scoring", "medical-device", "other")
PARTY_FIELDS = ("legal_entity", "role", "privacy_officer", "jurisdiction")
INTENDED_USE_FIELDS = ("purpose", "users", "out_of_scope")
AGREEMENT_FIELDS = ("id", "kind", "parties", "sha256", "title")
PARTIES_FIELDS = ("schema_version", "intended_use", "coordinator", "sites", "agreements", "regimes")
# How a site's records are de-identified before they reach training (HIPAA 164.514; GDPR Art. 4(5) and recital 26).
DEIDENTIFICATION = ("identified", "pseudonymised", "limited-data-set", "safe-harbor", "expert-determination",
                    "anonymised")
GOVERNANCE_FIELDS = ("lawful_basis", "data_subjects", "data_categories", "special_categories", "deidentification",
                     "deidentification_reference", "erasure")
SITE_NAME = re.compile(r"[A-Za-z0-9_-]+")
HEX_DIGEST = re.compile(r"[0-9a-f]{64}")


# ------------------------------------------------------------------------------------------------ field readers
def _text(table: Mapping[str, Any], key: str, where: str, hint: str) -> str | None:
    """An optional non-empty string: absent is None (the report says not assessed); empty or FILL IN is an error."""
    if key not in table:
        return None
    value = table[key]
    if not isinstance(value, str) or not value.strip() or value.startswith("FILL IN"):
        raise ConfigError(f"{where} {key} must be {hint} (a non-empty string), got {value!r}; fill it in or remove "
                          "the field (the report then says it is not assessed).")
    return value.strip()


def _texts(table: Mapping[str, Any], key: str, where: str, hint: str, allow_empty: bool = False
           ) -> tuple[str, ...] | None:
    """An optional list of non-empty strings; None when absent. ``allow_empty``: [] declares "none"."""
    if key not in table:
        return None
    value = table[key]
    if (not isinstance(value, list) or (not value and not allow_empty)
            or not all(isinstance(v, str) and v.strip() and not v.startswith("FILL IN") for v in value)):
        raise ConfigError(f"{where} {key} must be a list of {hint} (non-empty strings"
                          + ("; [] for none" if allow_empty else ", at least one") + f"), got {value!r}.")
    return tuple(v.strip() for v in value)


def _choice(table: Mapping[str, Any], key: str, where: str, choices: tuple[str, ...]) -> str | None:
    value = _text(table, key, where, f"one of {', '.join(choices)}")
    if value is not None and value not in choices:
        raise ConfigError(f"{where} {key} must be one of {', '.join(choices)}, got {value!r}.")
    return value


def _table(raw: Mapping[str, Any], key: str, where: str) -> Mapping[str, Any]:
    value = raw.get(key, {})
    if not isinstance(value, Mapping):
        raise ConfigError(f"{where} [{key}] must be a table, got {value!r}.")
    return value


def _drop_none(mapping: dict[str, Any]) -> dict[str, Any]:
    """Only what was stated: an absent field stays absent in the ledger, so the report marks it not assessed."""
    return {key: list(value) if isinstance(value, tuple) else value for key, value in mapping.items()
            if value is not None}


# ------------------------------------------------------------------------------------------------ parties.toml
@dataclass(frozen=True)
class Party:
    """The coordinator's or one site's legal identity as the operator declares it."""

    legal_entity: str | None = None
    role: tuple[str, ...] | None = None
    privacy_officer: str | None = None
    jurisdiction: str | None = None

    @classmethod
    def from_dict(cls, raw: Any, where: str) -> Party:
        if not isinstance(raw, Mapping):
            raise ConfigError(f"{where} must be a table with {', '.join(PARTY_FIELDS)}, got {raw!r}.")
        reject_unknown_fields(raw, PARTY_FIELDS, where)
        roles = _texts(raw, "role", where, f"roles from {', '.join(ROLES)}")
        unknown = [role for role in roles or () if role not in ROLES]
        if unknown:
            raise ConfigError(f"{where} role names {', '.join(map(repr, unknown))}; each role must be one of "
                              f"{', '.join(ROLES)}.")
        return cls(_text(raw, "legal_entity", where, "the party's registered legal name"), roles,
                   _text(raw, "privacy_officer", where, "the privacy officer's or DPO's name and contact"),
                   _text(raw, "jurisdiction", where, "where the party is established (e.g. \"US-PA\", \"DE\")"))

    def to_dict(self) -> dict[str, Any]:
        return _drop_none({"legal_entity": self.legal_entity, "role": self.role,
                           "privacy_officer": self.privacy_officer, "jurisdiction": self.jurisdiction})


@dataclass(frozen=True)
class Agreement:
    """A BAA, DPA, Art. 26 arrangement or data use agreement, cited by its id and (optionally) its document's hash."""

    id: str
    kind: str
    parties: tuple[str, ...]
    sha256: str | None = None
    title: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return _drop_none({"id": self.id, "kind": self.kind, "parties": self.parties, "sha256": self.sha256,
                           "title": self.title})


@dataclass(frozen=True)
class Regime:
    """One regime the federation declares; only the fields of :data:`REGIME_FIELDS` for its key are set."""

    key: str
    role: str | None = None
    use_case: str | None = None
    model_owner: str | None = None
    risk_tier: str | None = None
    inventory_id: str | None = None
    independent_validator: str | None = None
    qualified_individual: str | None = None
    notes: str | None = None

    @property
    def name(self) -> str:
        return REGIMES[self.key]

    @classmethod
    def from_dict(cls, key: str, raw: Any, where: str) -> Regime:
        if key not in REGIMES:
            raise ConfigError(f"{where}: unknown regime [regimes.{key}]; declare one of "
                              f"{', '.join(f'[regimes.{k}]' for k in REGIMES)} (an empty table declares it).")
        section = f"{where} [regimes.{key}]"
        if not isinstance(raw, Mapping):
            raise ConfigError(f"{section} must be a table (an empty one declares the regime), got {raw!r}.")
        reject_unknown_fields(raw, REGIME_FIELDS[key], section)
        values = {name: _text(raw, name, section, "a short statement") for name in REGIME_FIELDS[key]}
        if key == "eu_ai_act":
            # The risk class, and with it which articles apply, follows from the use: it must be stated.
            for name, choices in (("role", AI_ACT_ROLES), ("use_case", AI_ACT_USE_CASES)):
                if values[name] is None:
                    raise ConfigError(f"{section} {name} is missing; set it to one of {', '.join(choices)} (the AI "
                                      "Act's obligations depend on it).")
                values[name] = _choice(raw, name, section, choices)
        return cls(key, **values)

    def to_dict(self) -> dict[str, Any]:
        return _drop_none({name: getattr(self, name) for name in REGIME_FIELDS[self.key]})


@dataclass(frozen=True)
class PartiesDeclaration:
    """parties.toml, parsed: the content the coordinator records, and (``digest``) what a verifier recomputes."""

    purpose: str | None
    users: tuple[str, ...] | None
    out_of_scope: tuple[str, ...] | None
    coordinator: Party | None
    sites: tuple[tuple[str, Party], ...]
    agreements: tuple[Agreement, ...]
    regimes: tuple[Regime, ...]
    # The SHA-256 of the file it was read from (None when read back from a ledger): recorded beside the content, so
    # the operator's copy can be matched to the event; not part of the content or its digest.
    source_sha256: str | None = field(default=None, compare=False)

    @property
    def site_parties(self) -> dict[str, Party]:
        return dict(self.sites)

    @property
    def regime_keys(self) -> tuple[str, ...]:
        return tuple(regime.key for regime in self.regimes)

    def regime(self, key: str) -> Regime | None:
        return next((regime for regime in self.regimes if regime.key == key), None)

    def to_dict(self) -> dict[str, Any]:
        """The canonical content: what the ledger event holds and what :attr:`digest` hashes."""
        return {"schema_version": SCHEMA_VERSION,
                "intended_use": _drop_none({"purpose": self.purpose, "users": self.users,
                                            "out_of_scope": self.out_of_scope}),
                "coordinator": self.coordinator.to_dict() if self.coordinator is not None else None,
                "sites": {name: party.to_dict() for name, party in self.sites},
                "agreements": [agreement.to_dict() for agreement in self.agreements],
                "regimes": {regime.key: regime.to_dict() for regime in self.regimes}}

    @property
    def digest(self) -> str:
        return digest_json(self.to_dict())

    @classmethod
    def from_dict(cls, raw: Any, where: str, source_sha256: str | None = None) -> PartiesDeclaration:
        """Parse parties.toml's tables (or the content a ledger event holds, which has the same shape)."""
        if not isinstance(raw, Mapping):
            raise ConfigError(f"{where}: a parties declaration must be a table, got {raw!r}.")
        if raw.get("schema_version") != SCHEMA_VERSION:
            raise ConfigError(f"{where}: schema_version {raw.get('schema_version')!r} is not {SCHEMA_VERSION}.")
        reject_unknown_fields(raw, PARTIES_FIELDS, where)
        use = _table(raw, "intended_use", where)
        reject_unknown_fields(use, INTENDED_USE_FIELDS, f"{where} [intended_use]")
        section = f"{where} [intended_use]"
        coordinator = raw.get("coordinator")
        sites = _table(raw, "sites", where)
        parsed_sites = []
        for name, table in sites.items():
            if not SITE_NAME.fullmatch(name):
                raise ConfigError(f"{where}: [sites.{name}]: a site name may hold letters, digits, '-' and '_' only "
                                  "(the name the operator registered for the site).")
            parsed_sites.append((name, Party.from_dict(table, f"{where} [sites.{name}]")))
        declared = {"coordinator", *sites}
        agreements = raw.get("agreements", [])
        if not isinstance(agreements, list):
            raise ConfigError(f"{where}: agreements must be an array of tables ([[agreements]]), got {agreements!r}.")
        regimes = _table(raw, "regimes", where)
        return cls(purpose=_text(use, "purpose", section, "what the model is for"),
                   users=_texts(use, "users", section, "who uses the model"),
                   out_of_scope=_texts(use, "out_of_scope", section, "uses the model is not for"),
                   coordinator=None if coordinator is None else Party.from_dict(coordinator, f"{where} [coordinator]"),
                   sites=tuple(sorted(parsed_sites)),
                   agreements=tuple(_agreement(a, f"{where} [[agreements]] #{number}", declared)
                                    for number, a in enumerate(agreements, start=1)),
                   regimes=tuple(Regime.from_dict(key, table, where) for key, table in sorted(regimes.items())),
                   source_sha256=source_sha256)


def _agreement(raw: Any, where: str, declared: set[str]) -> Agreement:
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{where} must be a table with {', '.join(AGREEMENT_FIELDS)}, got {raw!r}.")
    reject_unknown_fields(raw, AGREEMENT_FIELDS, where)
    agreement_id = _text(raw, "id", where, "the agreement's reference")
    kind = _text(raw, "kind", where, "its kind (e.g. \"business associate agreement\", \"GDPR Art. 26 arrangement\")")
    parties = _texts(raw, "parties", where, "the parties that signed it (\"coordinator\" or a site name)")
    for name, value in (("id", agreement_id), ("kind", kind), ("parties", parties)):
        if value is None:
            raise ConfigError(f"{where} {name} is missing; an agreement is cited by id, kind and parties.")
    unknown = sorted(set(parties) - declared)
    if unknown:
        raise ConfigError(f"{where} parties names {', '.join(unknown)}, which the file does not declare; add "
                          f"[sites.{unknown[0]}] (or [coordinator]) or fix the name.")
    digest = _text(raw, "sha256", where, "the SHA-256 of the signed document (64 lowercase hex digits)")
    if digest is not None and not HEX_DIGEST.fullmatch(digest):
        raise ConfigError(f"{where} sha256 must be 64 lowercase hex digits (`sha256sum FILE`), got {digest!r}.")
    return Agreement(agreement_id, kind, parties, digest, _text(raw, "title", where, "the agreement's title"))


def load_parties(path: Path) -> PartiesDeclaration:
    """Read and validate a parties.toml; every error names the file and the field."""
    path = Path(path).resolve()
    raw = load_versioned_toml(path, SCHEMA_VERSION, "write one as docs/deploy.md, 'Parties and governance', shows "
                                                    "(examples: docs/examples/).")
    return PartiesDeclaration.from_dict(raw, str(path), file_sha256(path))


def parties_event(run_id: str, parties: PartiesDeclaration) -> dict[str, Any]:
    """The coordinator's ``parties-declared`` payload: the parsed content, its digest (recomputable from the
    content) and the SHA-256 of the file it was read from, so the operator's copy can be matched to it."""
    return {"run_id": run_id, "parties": parties.to_dict(), "digest": parties.digest,
            "source_sha256": parties.source_sha256}


# ------------------------------------------------------------------------------------------------ site governance
@dataclass(frozen=True)
class Governance:
    """A site's own records of processing (GDPR Art. 30(1)(b)-(f), HIPAA 164.514), as its site engineer states them."""

    lawful_basis: str | None = None
    data_subjects: tuple[str, ...] | None = None
    data_categories: tuple[str, ...] | None = None
    special_categories: tuple[str, ...] | None = None
    deidentification: str | None = None
    deidentification_reference: str | None = None
    erasure: str | None = None

    @classmethod
    def from_dict(cls, raw: Any, where: str) -> Governance:
        if not isinstance(raw, Mapping):
            raise ConfigError(f"{where} must be a table with {', '.join(GOVERNANCE_FIELDS)}, got {raw!r}.")
        reject_unknown_fields(raw, GOVERNANCE_FIELDS, where)
        deidentification = _choice(raw, "deidentification", where, DEIDENTIFICATION)
        reference = _text(raw, "deidentification_reference", where,
                          "the expert determination's or method's document reference")
        if deidentification == "expert-determination" and reference is None:
            raise ConfigError(f"{where} deidentification = \"expert-determination\" needs deidentification_reference "
                              "(the expert's documented determination, HIPAA 164.514(b)(1)).")
        return cls(lawful_basis=_text(raw, "lawful_basis", where, "the lawful basis or HIPAA permission"),
                   data_subjects=_texts(raw, "data_subjects", where, "categories of data subjects"),
                   data_categories=_texts(raw, "data_categories", where, "categories of personal data"),
                   special_categories=_texts(raw, "special_categories", where,
                                             "special categories (GDPR Art. 9) or PHI", allow_empty=True),
                   deidentification=deidentification, deidentification_reference=reference,
                   erasure=_text(raw, "erasure", where, "when the records are erased"))

    def to_dict(self) -> dict[str, Any]:
        return _drop_none({name: getattr(self, name) for name in GOVERNANCE_FIELDS})


def load_site_governance(path: Path) -> dict[str, Governance]:
    """A simulation's site governance: one ``[governance.SITE]`` table per site, as each site.toml would hold it."""
    path = Path(path).resolve()
    raw = load_versioned_toml(path, SCHEMA_VERSION, "write one with a [governance.SITE] table per site "
                                                    "(docs/report.md, 'Parties and governance').")
    reject_unknown_fields(raw, ("schema_version", "governance"), str(path))
    tables = _table(raw, "governance", str(path))
    if not tables:
        raise ConfigError(f"{path}: no [governance.SITE] table; add one per site.")
    return {name: Governance.from_dict(table, f"{path} [governance.{name}]") for name, table in sorted(tables.items())}
