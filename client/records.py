"""Reading a deployed site's records: a CSV, JSON-lines or Parquet table into the arrays the trainer uses.

A classification site's table has a label, numeric features and optionally a person column (:func:`load_records`),
or, at a site with the run's preprocessor, raw columns (categories, raw amounts, missing values) that the
preprocessor turns into the teacher's features (:func:`load_raw_records`).
A text (causal-LM) site's table has one document per row in a text column (:func:`load_documents`), tokenized with
its teacher's tokenizer and split in order into train, validation and test (:func:`tokenize_documents`). Texts are
never logged, printed or quoted in an error: messages give counts and column names only.

Every problem is reported with the file and the column, because the person reading the message is a site
engineer who knows the table, not fedistill.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from distill.data import SplitData
from distill.preprocessing import Preprocessor
from protocols.canonical import digest_json, sha256_hex
from protocols.errors import DataError

FORMATS = {".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl", ".parquet": "parquet",
           ".pq": "parquet"}


@dataclass(frozen=True)
class RecordSchema:
    """Which columns hold the label, the features (in the teacher's input order) and, optionally, the person."""

    label: str
    classes: tuple[str, ...]
    features: tuple[str, ...]
    person_id: str | None = None

    def digest(self) -> str:
        """A digest of the schema (never of the records): what a report may show about a site's table."""
        return digest_json({"label": self.label, "classes": list(self.classes), "features": list(self.features),
                            "person_id": self.person_id})


def read_table(path: Path) -> pd.DataFrame:
    fmt = FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise DataError(f"data file '{path}': unknown format '{path.suffix}'; use .csv, .jsonl or .parquet.")
    if not path.is_file():
        raise DataError(f"data file '{path}' does not exist; check [data] path in site.toml.")
    try:
        if fmt == "csv":
            return pd.read_csv(path)
        if fmt == "jsonl":
            return pd.read_json(path, lines=True)
        return pd.read_parquet(path)
    except (ValueError, OSError, ImportError, pd.errors.ParserError) as err:
        raise DataError(f"data file '{path}' cannot be read as {fmt}: {err}") from None


def _check_columns(frame: pd.DataFrame, path: Path, wanted: list[str], fix: str) -> None:
    missing = [column for column in wanted if column not in frame.columns]
    if missing:
        raise DataError(f"data file '{path}' has no column(s) {', '.join(repr(c) for c in missing)}; its columns are "
                        f"{', '.join(map(str, frame.columns))}. {fix}")


def _check_features(frame: pd.DataFrame, path: Path, features: tuple[str, ...]) -> None:
    for column in features:
        values = frame[column]
        if not (pd.api.types.is_numeric_dtype(values) or pd.api.types.is_bool_dtype(values)):
            raise DataError(f"data file '{path}': feature column '{column}' is {values.dtype}, not numeric; encode it "
                            "as numbers (as the teacher expects) or leave it out of [data] features.")
        if values.isna().any():
            raise DataError(f"data file '{path}': feature column '{column}' has {int(values.isna().sum())} missing "
                            "value(s); impute them the way the teacher was trained, or drop those records.")


def load_records(path: Path, schema: RecordSchema) -> SplitData:
    """The whole table as one split: inputs ``{"x": float32 [n, features]}``, class-index labels, person ids."""
    frame = read_table(path)
    if frame.empty:
        raise DataError(f"data file '{path}' has no records.")
    wanted = [schema.label, *schema.features] + ([schema.person_id] if schema.person_id else [])
    _check_columns(frame, path, wanted, "Fix [data] in site.toml or the file.")
    _check_features(frame, path, schema.features)
    labels = frame[schema.label]
    if labels.isna().any():
        raise DataError(f"data file '{path}': label column '{schema.label}' has {int(labels.isna().sum())} missing "
                        "value(s).")
    names = labels.astype(str)
    unknown = sorted(set(names) - set(schema.classes))
    if unknown:
        raise DataError(f"data file '{path}': label column '{schema.label}' holds value(s) "
                        f"{', '.join(repr(u) for u in unknown[:5])} not in [data] classes {list(schema.classes)}.")
    index = {name: i for i, name in enumerate(schema.classes)}
    groups = person_ids(frame[schema.person_id]) if schema.person_id else np.zeros(0, dtype=np.int64)
    return SplitData({"x": frame[list(schema.features)].to_numpy(dtype=np.float32)},
                     names.map(index).to_numpy(dtype=np.int64), groups)


def load_raw_records(path: Path, preprocessor: Preprocessor, person_id: str | None) -> SplitData:
    """A raw table through the run's preprocessor: float32 features in the teacher's order, labels by the spec's
    classes (the teacher's logit order), person ids from ``person_id``; errors name the file and the column."""
    frame = read_table(path)
    if frame.empty:
        raise DataError(f"data file '{path}' has no records.")
    if person_id:
        _check_columns(frame, path, [person_id], "Fix [data] person_id in site.toml or the file.")
    where = f"data file '{path}'"
    features = preprocessor.transform(frame, where)
    labels = preprocessor.labels(frame, where)
    groups = person_ids(frame[person_id]) if person_id else np.zeros(0, dtype=np.int64)
    return SplitData({"x": features}, labels, groups)


def load_inputs(path: Path, features: tuple[str, ...]) -> dict[str, np.ndarray]:
    """A table's feature columns only, as a model's inputs ``{"x": float32 [n, features]}``: a knowledge run's
    proxy set is made from public records this way, without their labels."""
    frame = read_table(path)
    if frame.empty:
        raise DataError(f"data file '{path}' has no records.")
    _check_columns(frame, path, list(features), "Name the feature columns in the sites' [data] features order.")
    _check_features(frame, path, features)
    return {"x": frame[list(features)].to_numpy(dtype=np.float32)}


def person_ids(column: pd.Series) -> np.ndarray:
    """Each record's person as a 63-bit id that depends on that person's value alone (a SHA-256 prefix), not on
    the order or presence of the others, as a numbering of the column would: a PATE partition by person
    (client/pate.py) must not move anyone else when one person is added or removed."""
    return np.array([int(sha256_hex(value)[:15], 16) for value in column.astype(str)], dtype=np.int64)


# --------------------------------------------------------------------------------------------- text sites
# A text site's documents are split in their order (oldest first when [data] order_by names a time column):
# train the first 70%, validation the next 10%, test the newest 20%, as the health-tweets simulation splits.
VALIDATION_SHARE, TEST_SHARE = 0.1, 0.2
# Fewer kept documents than this leave no validation or test split worth the name.
MIN_DOCUMENTS = 10
# A document needs a context and a next token; shorter ones predict nothing and are dropped (and counted).
MIN_TOKENS = 2


@dataclass(frozen=True)
class TextSchema:
    """A text (causal-LM) site's table: the text column, tokens per document, the person and the order columns."""

    text: str
    max_length: int
    person_id: str | None = None
    order_by: str | None = None

    def digest(self) -> str:
        """A digest of the schema (never of the texts)."""
        return digest_json({"text": self.text, "max_length": self.max_length, "person_id": self.person_id,
                            "order_by": self.order_by})


@dataclass(frozen=True)
class Documents:
    """A text site's documents in split order (by ``order_by``, else the file's order), with their persons.

    ``persons`` are per-document person ids (:func:`person_ids` of the person column), or empty when the table
    names no person: each document is then its own unit of privacy.
    """

    texts: tuple[str, ...]
    persons: np.ndarray
    missing: int  # documents whose text is empty or blank (kept as "", so they are dropped as too short)


@dataclass(frozen=True)
class TextData:
    """A text site's tokenized splits and what ``site check`` says about them (counts only, never text)."""

    splits: dict[str, SplitData]
    documents: int  # rows of the table
    dropped: int  # documents of fewer than MIN_TOKENS tokens (empty ones included)
    limited: int  # training documents left out by max_records_per_person
    persons: int | None  # distinct persons among the kept documents; None without [data] person_id

    def tokens(self, split: str) -> int:
        return int(self.splits[split].inputs["attention_mask"].sum())

    def at_max_length(self) -> int:
        """Documents whose tokens fill max_length (longer ones were cut there)."""
        return int(sum((s.inputs["attention_mask"].sum(axis=1) == s.inputs["attention_mask"].shape[1]).sum()
                       for s in self.splits.values()))


def _order(frame: pd.DataFrame, path: Path, column: str) -> np.ndarray:
    """Row order by the ``order_by`` column, oldest first (stable): numbers, datetimes or ISO 8601 text."""
    values = frame[column]
    if values.isna().any():
        raise DataError(f"data file '{path}': order column '{column}' ([data] order_by) has "
                        f"{int(values.isna().sum())} missing value(s); every document needs its time (or position).")
    if pd.api.types.is_bool_dtype(values):
        raise DataError(f"data file '{path}': order column '{column}' ([data] order_by) is boolean; it needs times or "
                        "numbers to sort the documents by.")
    if not (pd.api.types.is_numeric_dtype(values) or pd.api.types.is_datetime64_any_dtype(values)):
        try:
            values = pd.to_datetime(values.astype(str), format="ISO8601", utc=True)
        except (ValueError, TypeError):
            # The values are not shown: a date can identify a person as well as a text can.
            raise DataError(f"data file '{path}': order column '{column}' ([data] order_by) holds values that are "
                            "neither numbers nor ISO 8601 dates/times (such as 2015-03-01 or 2015-03-01T12:00:00Z); "
                            "convert it, or name another column.") from None
    if pd.api.types.is_datetime64_any_dtype(values):  # time zones compared in UTC; naive times taken as UTC
        return np.argsort(pd.to_datetime(values, utc=True).dt.tz_convert(None).to_numpy(), kind="stable")
    return np.argsort(values.to_numpy(), kind="stable")


def load_documents(path: Path, schema: TextSchema) -> Documents:
    """A text site's table: the text column in split order, with person ids; errors name the file and column."""
    frame = read_table(path)
    if frame.empty:
        raise DataError(f"data file '{path}' has no records.")
    wanted = [schema.text] + [c for c in (schema.person_id, schema.order_by) if c]
    missing = [column for column in wanted if column not in frame.columns]
    if missing:
        raise DataError(f"data file '{path}' has no column(s) {', '.join(repr(c) for c in missing)}; its columns are "
                        f"{', '.join(map(str, frame.columns))}. Fix [data] in site.toml or the file.")
    if schema.order_by:
        frame = frame.iloc[_order(frame, path, schema.order_by)]
    values = frame[schema.text]
    empty = values.isna()
    strings = values[~empty].map(lambda v: isinstance(v, str))
    if not strings.all():
        raise DataError(f"data file '{path}': text column '{schema.text}' ([data] text) holds "
                        f"{int((~strings).sum())} value(s) that are not text (numbers or other values); name the "
                        "column holding each document's text.")
    if schema.person_id and frame[schema.person_id].isna().any():
        raise DataError(f"data file '{path}': person column '{schema.person_id}' has "
                        f"{int(frame[schema.person_id].isna().sum())} missing value(s); every document needs its "
                        "person, or group privacy cannot count them.")
    persons = (person_ids(frame[schema.person_id]) if schema.person_id
               else np.zeros(0, dtype=np.int64))
    texts = tuple(values.where(~empty, "").tolist())
    return Documents(texts, persons, sum(1 for text in texts if not text.strip()))


def split_in_order(n: int) -> dict[str, slice]:
    """Train the first documents, validation the next VALIDATION_SHARE, test the last TEST_SHARE."""
    n_test, n_val = int(round(TEST_SHARE * n)), int(round(VALIDATION_SHARE * n))
    return {"train": slice(0, n - n_val - n_test), "val": slice(n - n_val - n_test, n - n_test),
            "test": slice(n - n_test, n)}


def tokenize_documents(path: Path, documents: Documents, schema: TextSchema, tokenizer: object,
                       max_records_per_person: int = 0) -> TextData:
    """Tokenize every document with the teacher's tokenizer (right padding, ``schema.max_length`` tokens), drop the
    ones of fewer than MIN_TOKENS tokens, split the rest in order; labels are zeros (next-token prediction has
    none), groups are the persons, or one per document. ``max_records_per_person`` limits the training split."""
    from distill.causal_lm import tokenize_texts

    encoded = tokenize_texts(tokenizer, documents.texts, schema.max_length)
    keep = encoded["attention_mask"].sum(axis=1) >= MIN_TOKENS
    kept = int(keep.sum())
    if kept < MIN_DOCUMENTS:
        raise DataError(f"data file '{path}': {kept} of {len(documents.texts)} document(s) in text column "
                        f"'{schema.text}' have at least {MIN_TOKENS} tokens; a text site needs at least "
                        f"{MIN_DOCUMENTS} (for its training, validation and test splits).")
    encoded = {key: value[keep] for key, value in encoded.items()}
    groups = documents.persons[keep] if len(documents.persons) else np.arange(kept, dtype=np.int64)
    whole = SplitData(encoded, np.zeros(kept, dtype=np.int64), groups)
    splits = {name: whole.subset(np.arange(kept)[part]) for name, part in split_in_order(kept).items()}
    limited = 0
    if max_records_per_person:
        before = len(splits["train"])
        splits["train"] = splits["train"].limit_records_per_person(max_records_per_person, seed=0)
        limited = before - len(splits["train"])
    persons = int(len(np.unique(groups))) if len(documents.persons) else None
    return TextData(splits, len(documents.texts), len(documents.texts) - kept, limited, persons)
