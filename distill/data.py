"""A split of records as named numpy arrays: model inputs, labels, and the person each record belongs to."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from protocols.canonical import atomic_write_bytes, digest_arrays
from protocols.errors import DataError


@dataclass(frozen=True)
class SplitData:
    """``inputs`` are ``{"x": float32 [n, d]}`` for tabular records or ``{"input_ids", "attention_mask"}`` for text."""

    inputs: dict[str, np.ndarray]
    labels: np.ndarray
    groups: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))

    def __post_init__(self) -> None:
        sizes = {name: len(a) for name, a in self.inputs.items()} | {"labels": len(self.labels)}
        if len(set(sizes.values())) > 1:
            raise DataError(f"split arrays disagree on the number of records: {sizes}.")
        if len(self.groups) not in (0, len(self.labels)):
            raise DataError(f"split has {len(self.labels)} labels but {len(self.groups)} group ids.")

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, index: np.ndarray) -> SplitData:
        return SplitData({k: v[index] for k, v in self.inputs.items()}, self.labels[index],
                         self.groups[index] if len(self.groups) else self.groups)

    def max_records_per_person(self) -> int:
        """The most records any one person has in this split (1 when records carry no person id)."""
        if len(self) == 0:
            return 0
        if not len(self.groups):
            return 1
        return int(np.unique(self.groups, return_counts=True)[1].max())

    def limit_records_per_person(self, k: int, seed: int) -> SplitData:
        """Keep at most ``k`` randomly chosen records of each person (group privacy then bounds a person's loss)."""
        if not len(self.groups):
            return self
        order = np.random.default_rng(seed).permutation(len(self))
        seen: dict[int, int] = {}
        kept = []
        for index in order:
            person = int(self.groups[index])
            if seen.get(person, 0) < k:
                seen[person] = seen.get(person, 0) + 1
                kept.append(index)
        return self.subset(np.sort(np.array(kept, dtype=np.int64)))

    def digest(self) -> str:
        return digest_arrays({**{f"input.{k}": v for k, v in self.inputs.items()}, "labels": self.labels})

    @staticmethod
    def concatenate(splits: list[SplitData]) -> SplitData:
        keys = splits[0].inputs.keys()
        return SplitData({k: np.concatenate([s.inputs[k] for s in splits]) for k in keys},
                         np.concatenate([s.labels for s in splits]),
                         np.concatenate([s.groups for s in splits]))


def save_splits(path: Path, splits: dict[str, SplitData]) -> None:
    arrays: dict[str, np.ndarray] = {}
    for split, data in splits.items():
        arrays |= {f"{split}.input.{k}": v for k, v in data.inputs.items()}
        arrays[f"{split}.labels"] = data.labels
        arrays[f"{split}.groups"] = data.groups
    import io

    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    atomic_write_bytes(Path(path), buffer.getvalue())


def load_splits(path: Path) -> dict[str, SplitData]:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"site data file '{path}' does not exist; prepare the site first.")
    with np.load(path, allow_pickle=False) as archive:
        names = {key.split(".", 1)[0] for key in archive.files}
        return {split: SplitData({key.split(".input.", 1)[1]: archive[key] for key in archive.files
                                  if key.startswith(f"{split}.input.")},
                                 archive[f"{split}.labels"], archive[f"{split}.groups"])
                for split in sorted(names)}
