"""A table's preprocessing: fitted once on public reference data, pinned by digest, applied the same at every site.

A bank's table has categorical columns and raw amounts. The teacher and the student read numbers in a fixed order,
so every site must turn its table into exactly the features the teacher was fitted on. A
:class:`PreprocessingSpec` says what each raw column is; :func:`fit_preprocessor` fits scikit-learn's transformers
on the public reference data only (no site record), giving a :class:`Preprocessor`. It is saved as one skops file
(scikit-learn's objects without pickle: loading runs no code) whose SHA-256 the run config pins
(``preprocessing_digest``), so a site applies the consortium's preprocessing and no other.

Column kinds:

- ``numeric``: missing values take the public median, then z-scored with the public mean and deviation.
- ``amount``: a raw money amount (heavy-tailed, may be negative): public median imputed, then Yeo-Johnson and
  z-scored (``PowerTransformer``), so a site sends no hand-scaled numbers.
- ``categorical``: missing values take the public mode, then one-hot over the public data's categories. A site
  category the public data never had is an error that names the column: silently zeroing it would feed the teacher
  an input it never saw.

Error messages name the file and the column, with counts; they quote category values (never a record) so that a
site engineer can map them.
"""

from __future__ import annotations

import io
import json
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import pandas as pd

from protocols.canonical import atomic_write_bytes, file_sha256
from protocols.errors import ConfigError, DataError
from protocols.fields import reject_unknown_fields

SCHEMA_VERSION = 1
# Its name in a run directory and in a site's state directory.
PREPROCESSOR_FILE = "preprocessor.skops"
KINDS = ("numeric", "amount", "categorical")
# The types a preprocessor file may hold; any other is refused before anything is built (_stored_types).
_TRUSTED = [
    "sklearn.compose._column_transformer.ColumnTransformer",
    "sklearn.pipeline.Pipeline",
    "sklearn.impute._base.SimpleImputer",
    "sklearn.preprocessing._data.StandardScaler",
    "sklearn.preprocessing._data.PowerTransformer",
    "sklearn.preprocessing._encoders.OneHotEncoder",
    "sklearn.utils._bunch.Bunch",
    "builtins.slice",
    "numpy.dtype",
]


@dataclass(frozen=True)
class ColumnSpec:
    name: str
    kind: str

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ConfigError(f"preprocessing column {self.name!r}: kind {self.kind!r} is not one of "
                              f"{', '.join(KINDS)}.")


@dataclass(frozen=True)
class PreprocessingSpec:
    """What each raw column of a table is, the label column and its classes in the teacher's logit order."""

    columns: tuple[ColumnSpec, ...]
    label: str
    classes: tuple[str, ...]
    person_id: str | None = None

    def __post_init__(self) -> None:
        names = [column.name for column in self.columns]
        if not names:
            raise ConfigError("preprocessing spec: 'columns' is empty; name at least one feature column.")
        if len(set(names)) != len(names):
            raise ConfigError(f"preprocessing spec: a column is named twice in {names}.")
        if self.label in names or (self.person_id is not None and self.person_id in names):
            raise ConfigError("preprocessing spec: the label and person columns cannot also be feature columns.")
        if len(self.classes) < 2 or len(set(self.classes)) != len(self.classes):
            raise ConfigError(f"preprocessing spec: 'classes' must be two or more distinct names, got "
                              f"{list(self.classes)}.")

    @property
    def raw_columns(self) -> tuple[str, ...]:
        return tuple(column.name for column in self.columns)

    def of_kind(self, kind: str) -> list[str]:
        return [column.name for column in self.columns if column.kind == kind]

    def to_dict(self) -> dict[str, Any]:
        return {"columns": [{"name": c.name, "kind": c.kind} for c in self.columns], "label": self.label,
                "classes": list(self.classes), "person_id": self.person_id}

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any], where: str = "preprocessing spec") -> PreprocessingSpec:
        reject_unknown_fields(raw, ("columns", "label", "classes", "person_id"), where)
        columns = raw.get("columns")
        if not isinstance(columns, list) or not all(isinstance(c, Mapping) for c in columns):
            raise ConfigError(f"{where}: 'columns' must be a list of {{name, kind}} tables.")
        for column in columns:
            reject_unknown_fields(column, ("name", "kind"), f"{where} column")
        label, classes = raw.get("label"), raw.get("classes")
        if not isinstance(label, str) or not isinstance(classes, list):
            raise ConfigError(f"{where}: 'label' (a column name) and 'classes' (a list) are required.")
        person = raw.get("person_id")
        return cls(tuple(ColumnSpec(str(c.get("name")), str(c.get("kind"))) for c in columns), label,
                   tuple(str(c) for c in classes), None if person is None else str(person))


class Preprocessor:
    """A fitted :class:`PreprocessingSpec`: raw table in, the teacher's float32 features out, in a fixed order."""

    def __init__(self, spec: PreprocessingSpec, transformer: Any) -> None:
        self.spec = spec
        self._transformer = transformer
        self.feature_names: tuple[str, ...] = tuple(str(n) for n in transformer.get_feature_names_out())
        self.categories: dict[str, tuple[str, ...]] = {}
        categorical = spec.of_kind("categorical")
        if categorical:
            encoder = transformer.named_transformers_["categorical"].named_steps["onehot"]
            self.categories = {name: tuple(str(v) for v in values)
                               for name, values in zip(categorical, encoder.categories_)}

    @property
    def input_dim(self) -> int:
        return len(self.feature_names)

    def check_columns(self, frame: pd.DataFrame, where: str) -> None:
        """Every raw column present and readable as its kind; every category one the public data had."""
        missing = [name for name in self.spec.raw_columns if name not in frame.columns]
        if missing:
            raise DataError(f"{where} has no column(s) {', '.join(map(repr, missing))} that the run's preprocessing "
                            f"reads; its columns are {', '.join(map(str, frame.columns))}. Rename them in the table, "
                            f"or ask the operator which table layout the preprocessing (raw columns "
                            f"{', '.join(self.spec.raw_columns)}) expects.")
        for name in self.spec.of_kind("numeric") + self.spec.of_kind("amount"):
            values = frame[name]
            parsed = pd.to_numeric(values, errors="coerce")
            bad = int((parsed.isna() & values.notna()).sum())
            if bad:
                raise DataError(f"{where}: column '{name}' is read as a number, but {bad} value(s) are not numbers "
                                "(an amount with a currency sign or thousands separator?); write plain numbers.")
        for name in self.spec.of_kind("categorical"):
            known = set(self.categories[name])
            seen = set(frame[name].dropna().astype(str))
            unknown = sorted(seen - known)
            if unknown:
                raise DataError(f"{where}: categorical column '{name}' has {len(unknown)} categor"
                                f"{'y' if len(unknown) == 1 else 'ies'} the public reference data never had "
                                f"({', '.join(map(repr, unknown[:3]))}{', ...' if len(unknown) > 3 else ''}); the "
                                f"run knows {', '.join(map(repr, sorted(known)))}. Map them onto these, or leave "
                                "those records out.")

    def transform(self, frame: pd.DataFrame, where: str) -> np.ndarray:
        self.check_columns(frame, where)
        return np.asarray(self._transformer.transform(_typed(self.spec, frame)), dtype=np.float32)

    def labels(self, frame: pd.DataFrame, where: str) -> np.ndarray:
        """The label column as class indices in the teacher's logit order."""
        if self.spec.label not in frame.columns:
            raise DataError(f"{where} has no label column '{self.spec.label}'.")
        values = frame[self.spec.label]
        if values.isna().any():
            raise DataError(f"{where}: label column '{self.spec.label}' has {int(values.isna().sum())} missing "
                            "value(s); drop those records.")
        names = values.astype(str)
        unknown = sorted(set(names) - set(self.spec.classes))
        if unknown:
            raise DataError(f"{where}: label column '{self.spec.label}' holds value(s) "
                            f"{', '.join(map(repr, unknown[:5]))} that are not the run's classes "
                            f"{list(self.spec.classes)} (in the teacher's logit order).")
        index = {name: i for i, name in enumerate(self.spec.classes)}
        return names.map(index).to_numpy(dtype=np.int64)

    def to_bytes(self) -> bytes:
        """The skops file's bytes, the same for the same fitted preprocessor: their SHA-256 is what a run pins."""
        import skops.io as sio

        buffer = io.BytesIO()
        sio.dump({"schema_version": SCHEMA_VERSION, "spec": _plain(self.spec.to_dict()),
                  "transformer": self._transformer}, buffer)
        return _reproducible_zip(buffer.getvalue())

    def save(self, path: Path) -> str:
        """Written atomically as one skops file; returns its SHA-256, the run config's ``preprocessing_digest``."""
        atomic_write_bytes(Path(path), self.to_bytes())
        return file_sha256(Path(path))

    def describe(self) -> dict[str, Any]:
        """What a report or ``site check`` shows: the spec, the output features and the categories (no records)."""
        return {"spec": self.spec.to_dict(), "features": list(self.feature_names),
                "categories": {name: list(values) for name, values in self.categories.items()}}


def _reproducible_zip(data: bytes) -> bytes:
    """The skops archive made byte-for-byte reproducible, so that the same fitted preprocessor always has the same
    digest (a simulated run's id is a hash of its config, which pins it): skops names objects and array files by
    Python's ``id()``, so they are renumbered in their order of appearance, and the zip gets fixed timestamps."""
    with zipfile.ZipFile(io.BytesIO(data)) as source:
        schema = source.read("schema.json").decode()
        arrays = {name: source.read(name) for name in source.namelist() if name != "schema.json"}
    numbers: dict[str, str] = {}

    def renumber(match: re.Match[str]) -> str:
        return match.group("key") + numbers.setdefault(match.group("id"), str(len(numbers) + 1))

    schema = re.sub(r'(?P<key>"__id__": |"file": ")(?P<id>\d+)', renumber, schema)
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as target:
        entries = {"schema.json": schema.encode()}
        entries |= {f"{numbers[name.removesuffix('.npy')]}.npy": content for name, content in arrays.items()}
        for name in sorted(entries):
            target.writestr(zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0)), entries[name],
                            compress_type=zipfile.ZIP_DEFLATED)
    return out.getvalue()


def _plain(value: Any) -> Any:
    # skops stores dicts and lists of strings; None is kept as an empty marker it can persist.
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_plain(item) for item in value]
    return "" if value is None else value


def fit_preprocessor(spec: PreprocessingSpec, public: pd.DataFrame) -> Preprocessor:
    """scikit-learn's imputers, scalers and one-hot encoder, fitted on the public reference frame only."""
    from sklearn.compose import ColumnTransformer
    from sklearn.impute import SimpleImputer
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import OneHotEncoder, PowerTransformer, StandardScaler

    parts = []
    if spec.of_kind("numeric"):
        parts.append(("numeric", Pipeline([("impute", SimpleImputer(strategy="median")),
                                           ("scale", StandardScaler())]), spec.of_kind("numeric")))
    if spec.of_kind("amount"):
        parts.append(("amount", Pipeline([("impute", SimpleImputer(strategy="median")),
                                          ("scale", PowerTransformer(method="yeo-johnson", standardize=True))]),
                      spec.of_kind("amount")))
    if spec.of_kind("categorical"):
        parts.append(("categorical", Pipeline([("impute", SimpleImputer(strategy="most_frequent")),
                                               ("onehot", OneHotEncoder(handle_unknown="error", sparse_output=False,
                                                                        dtype=np.float32))]),
                      spec.of_kind("categorical")))
    transformer = ColumnTransformer(parts, remainder="drop", verbose_feature_names_out=True)
    transformer.fit(_typed(spec, public))
    return Preprocessor(spec, transformer)


def _typed(spec: PreprocessingSpec, frame: pd.DataFrame) -> pd.DataFrame:
    """The raw columns as the transformers read them: numbers as floats (NaN where missing), categories as
    strings, so that a CSV's 1 and a Parquet's "1" are the same category."""
    table = frame[list(spec.raw_columns)].copy()
    for name in spec.of_kind("numeric") + spec.of_kind("amount"):
        table[name] = pd.to_numeric(table[name], errors="coerce").astype(float)
    for name in spec.of_kind("categorical"):
        table[name] = table[name].map(lambda v: np.nan if pd.isna(v) else str(v)).astype(object)
    return table


# skops's nodes of plain data (containers, strings, numbers, arrays, dtypes, type references, an object met earlier in
# the same file): in builtins and numpy they need no trust; every other node must name one of _TRUSTED.
_PLAIN_LOADERS = frozenset({"DictNode", "ListNode", "TupleNode", "SliceNode", "JsonNode", "TypeNode", "NdArrayNode",
                            "DTypeNode", "CachedNode"})


def _stored_types(path: Path) -> list[str]:
    """Every type the skops file names that a preprocessor never holds, read from its schema alone. skops's own check
    (``get_untrusted_types``) trusts every scikit-learn estimator by default, so it would build a file holding a
    LogisticRegression, which a Preprocessor would then fail on unnamed."""
    import skops.io as sio

    with zipfile.ZipFile(path) as archive:
        schema = json.loads(archive.read("schema.json"))
    found, stack = set(sio.get_untrusted_types(file=path)), [schema]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            if "__class__" in node:
                module = node.get("__module__")
                if not (module in ("builtins", "numpy") and node.get("__loader__") in _PLAIN_LOADERS):
                    found.add(f"{module}.{node['__class__']}")
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    return sorted(found - set(_TRUSTED))


def load_preprocessor(path: Path, expected_digest: str | None = None, where: str = "preprocessor") -> Preprocessor:
    """A preprocessor file, checked against the digest the run pins before anything in it is read."""
    import skops.io as sio

    path = Path(path)
    if not path.is_file():
        raise DataError(f"{where} '{path}' is not a file; copy the preprocessor the consortium operator shipped "
                        "there.")
    digest = file_sha256(path)
    if expected_digest is not None and digest != expected_digest:
        raise DataError(f"{where} '{path}' has SHA-256 {digest}, but the run pins preprocessing_digest "
                        f"{expected_digest}; this is not the run's preprocessing. Ask the operator for the file.")
    try:
        untrusted = _stored_types(path)
        if untrusted:
            raise DataError(f"{where} '{path}' holds type(s) {', '.join(untrusted)} that a preprocessor never "
                            "contains; it is refused unread.")
        stored = sio.load(path, trusted=_TRUSTED)
    except DataError:
        raise
    except Exception as err:  # skops raises zip, JSON and its own errors for a file it did not write
        raise DataError(f"{where} '{path}' is not a fedistill preprocessor file ({type(err).__name__}: {err}).") \
            from None
    if not isinstance(stored, dict) or stored.get("schema_version") != SCHEMA_VERSION:
        raise DataError(f"{where} '{path}' is not a fedistill preprocessor of schema_version {SCHEMA_VERSION}.")
    raw = dict(stored["spec"])
    raw["person_id"] = raw.get("person_id") or None
    return Preprocessor(PreprocessingSpec.from_dict(raw, where), stored["transformer"])
