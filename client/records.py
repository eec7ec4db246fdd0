"""Reading a deployed site's records: a CSV, JSON-lines or Parquet table into the arrays the trainer uses.

Every problem is reported with the file and the column, because the person reading the message is a site
engineer who knows the table, not fedistill.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from distill.data import SplitData
from protocols.canonical import digest_json
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


def load_records(path: Path, schema: RecordSchema) -> SplitData:
    """The whole table as one split: inputs ``{"x": float32 [n, features]}``, class-index labels, person ids."""
    frame = read_table(path)
    if frame.empty:
        raise DataError(f"data file '{path}' has no records.")
    wanted = [schema.label, *schema.features] + ([schema.person_id] if schema.person_id else [])
    missing = [column for column in wanted if column not in frame.columns]
    if missing:
        raise DataError(f"data file '{path}' has no column(s) {', '.join(repr(c) for c in missing)}; its columns are "
                        f"{', '.join(map(str, frame.columns))}. Fix [data] in site.toml or the file.")
    for column in schema.features:
        values = frame[column]
        if not (pd.api.types.is_numeric_dtype(values) or pd.api.types.is_bool_dtype(values)):
            raise DataError(f"data file '{path}': feature column '{column}' is {values.dtype}, not numeric; encode it "
                            "as numbers (as the teacher expects) or leave it out of [data] features.")
        if values.isna().any():
            raise DataError(f"data file '{path}': feature column '{column}' has {int(values.isna().sum())} missing "
                            "value(s); impute them the way the teacher was trained, or drop those records.")
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
    groups = (pd.factorize(frame[schema.person_id].astype(str))[0].astype(np.int64) if schema.person_id
              else np.zeros(0, dtype=np.int64))
    return SplitData({"x": frame[list(schema.features)].to_numpy(dtype=np.float32)},
                     names.map(index).to_numpy(dtype=np.int64), groups)
