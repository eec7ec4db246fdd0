"""Students and teachers.

Students are built from a :class:`protocols.config.StudentSpec`: small torch networks for tabular
records (``mlp``) or BERT-style sequence classifiers from transformers (``bert``), either from a config
or from a local checkpoint directory. Teachers are anything that yields logits: a transformers
checkpoint directory, a pooled-encoder directory (a frozen sentence encoder plus a linear head), a
torch module, a fitted scikit-learn estimator or a precomputed logits file.
"""

from __future__ import annotations

import hashlib
import io
import json
import pickle
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from safetensors import SafetensorError
from safetensors.torch import load_file, save

from protocols.canonical import atomic_write_bytes, atomic_write_json, sha256_hex
from protocols.config import StudentSpec
from protocols.errors import ConfigError, DataError

Inputs = Mapping[str, np.ndarray]
TEXT_INPUTS = ("input_ids", "attention_mask")
TABULAR_INPUTS = ("x",)


# --------------------------------------------------------------------------------------------- students
class TabularMLP(nn.Module):
    """A small fully connected network for tabular records; one fragment per ``layers.<i>`` Linear."""

    def __init__(self, input_dim: int, hidden: Sequence[int], num_classes: int) -> None:
        super().__init__()
        sizes = [input_dim, *hidden]
        modules: list[nn.Module] = []
        for fan_in, fan_out in zip(sizes[:-1], sizes[1:]):
            modules += [nn.Linear(fan_in, fan_out), nn.ReLU()]
        modules.append(nn.Linear(sizes[-1], num_classes))
        self.layers = nn.Sequential(*modules)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


def build_student(spec: StudentSpec) -> nn.Module:
    """Build a freshly initialised (seeded by the caller) student, or load one from a local checkpoint."""
    settings = dict(spec.settings)
    if spec.family == "causal_lm":
        from distill.causal_lm import build_causal_lm_student

        return build_causal_lm_student(spec.causal_lm())
    if spec.family == "mlp":
        try:
            return TabularMLP(int(settings["input_dim"]), [int(h) for h in settings["hidden"]],
                              int(settings["num_classes"]))
        except KeyError as missing:
            raise ConfigError(f"student spec (mlp): setting {missing} is missing; an mlp needs input_dim, hidden "
                              "and num_classes.") from None
    from transformers import BertConfig, BertForSequenceClassification

    checkpoint = settings.pop("checkpoint", None)
    if checkpoint:
        path = Path(checkpoint)
        if not (path / "config.json").is_file():
            raise ConfigError(f"student spec (bert): checkpoint '{path}' has no config.json; point it at a "
                              "directory written by save_pretrained.")
        return BertForSequenceClassification.from_pretrained(str(path), local_files_only=True)
    try:
        config = BertConfig(**settings)
    except TypeError as err:
        raise ConfigError(f"student spec (bert): invalid BertConfig settings: {err}") from None
    return BertForSequenceClassification(config)


def student_forward(model: nn.Module, family: str, batch: Mapping[str, torch.Tensor],
                    with_hidden: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Logits (and, for transformers, a mean-pooled last hidden state) of a batch.

    BERT gets contiguous per-sample ``position_ids`` and ``token_type_ids`` and ``input_ids`` positionally:
    Opacus's per-sample gradient modes need all three (reference: opacus_and_data.md section 2).
    """
    if family == "mlp":
        return model(batch["x"]), None
    input_ids, attention_mask = batch["input_ids"], batch["attention_mask"]
    size, length = input_ids.shape
    out = model(input_ids, attention_mask=attention_mask,
                position_ids=torch.arange(length).repeat(size, 1),
                token_type_ids=torch.zeros_like(input_ids), output_hidden_states=with_hidden)
    if not with_hidden:
        return out.logits, None
    return out.logits, mean_pool(out.hidden_states[-1], attention_mask)


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)


def state_to_numpy(model: nn.Module) -> dict[str, np.ndarray]:
    return {name: tensor.detach().cpu().numpy().copy() for name, tensor in model.state_dict().items()}


def load_numpy_state(model: nn.Module, state: Mapping[str, np.ndarray]) -> None:
    model.load_state_dict({name: torch.from_numpy(np.array(value)) for name, value in state.items()})


def student_state(model: nn.Module, family: str) -> dict[str, np.ndarray]:
    """The global student as it travels and is checkpointed: every tensor of a classifier; a causal LM's
    trainable tensors only (its frozen base is pinned by digest in the student spec and never sent)."""
    if family == "causal_lm":
        from distill.causal_lm import trainable_state

        return trainable_state(model)
    return state_to_numpy(model)


def load_student_state(model: nn.Module, family: str, state: Mapping[str, np.ndarray]) -> None:
    if family == "causal_lm":
        from distill.causal_lm import load_trainable_state

        load_trainable_state(model, state)
    else:
        load_numpy_state(model, state)


def fragment_parameter_names(model: nn.Module, family: str) -> list[str]:
    """The parameters fragments are made of: all of a classifier's, a causal LM's trainable ones."""
    if family == "causal_lm":
        from distill.causal_lm import trainable_tensor_names

        return list(trainable_tensor_names(model))
    return parameter_names(model)


def parameter_names(model: nn.Module) -> list[str]:
    return [name for name, _ in model.named_parameters()]


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# --------------------------------------------------------------------------------------------- teachers
class Teacher(Protocol):
    """Anything that yields logits for a site's inputs."""

    kind: str

    def logits(self, inputs: Inputs) -> np.ndarray: ...

    def hidden(self, inputs: Inputs) -> np.ndarray | None: ...

    def size(self) -> dict[str, Any]: ...


class PooledEncoderClassifier(nn.Module):
    """A frozen transformers encoder with mean pooling, L2 normalisation and a linear head.

    This is how a sentence-embedding model (such as all-MiniLM-L6-v2) becomes a classifier teacher.
    """

    def __init__(self, encoder: nn.Module, head: nn.Linear) -> None:
        super().__init__()
        self.encoder, self.head = encoder, head

    def embed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return nn.functional.normalize(mean_pool(hidden, attention_mask), dim=-1)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(input_ids, attention_mask))


def _batched(inputs: Inputs, keys: Sequence[str], batch_size: int):
    n = len(next(iter(inputs.values())))
    for start in range(0, n, batch_size):
        yield [torch.as_tensor(inputs[k][start:start + batch_size]) for k in keys]


class TorchTeacher:
    """A torch module called positionally with the named inputs, e.g. ``("x",)`` or ``("input_ids", "attention_mask")``."""

    kind = "torch-module"

    def __init__(self, module: nn.Module, keys: Sequence[str] = TABULAR_INPUTS, batch_size: int = 256) -> None:
        self.module, self.keys, self.batch_size = module.eval(), tuple(keys), batch_size

    @torch.no_grad()
    def logits(self, inputs: Inputs) -> np.ndarray:
        return np.concatenate([self.module(*batch).float().numpy() for batch in
                               _batched(inputs, self.keys, self.batch_size)])

    @torch.no_grad()
    def hidden(self, inputs: Inputs) -> np.ndarray | None:
        if not hasattr(self.module, "embed"):
            return None
        return np.concatenate([self.module.embed(*batch).float().numpy() for batch in
                               _batched(inputs, self.keys, self.batch_size)])

    def size(self) -> dict[str, Any]:
        return {"measure": "parameters", "value": count_parameters(self.module)}


class TransformersTeacher(TorchTeacher):
    """A sequence classifier saved with ``save_pretrained`` in a local directory (never fetched from a hub)."""

    kind = "transformers-checkpoint"

    def __init__(self, path: Path, batch_size: int = 64) -> None:
        from transformers import AutoModelForSequenceClassification

        model = AutoModelForSequenceClassification.from_pretrained(str(path), local_files_only=True)
        super().__init__(model, TEXT_INPUTS, batch_size)

    @torch.no_grad()
    def logits(self, inputs: Inputs) -> np.ndarray:
        return np.concatenate([self.module(input_ids=ids, attention_mask=mask).logits.float().numpy()
                               for ids, mask in _batched(inputs, TEXT_INPUTS, self.batch_size)])

    def hidden(self, inputs: Inputs) -> np.ndarray | None:
        return None


class SklearnTeacher:
    """A fitted scikit-learn classifier; logits from ``decision_function`` or the log of ``predict_proba``."""

    kind = "sklearn-estimator"

    def __init__(self, estimator: Any) -> None:
        if not (hasattr(estimator, "decision_function") or hasattr(estimator, "predict_proba")):
            raise ConfigError(f"teacher: {type(estimator).__name__} has neither decision_function nor predict_proba.")
        self.estimator = estimator

    def logits(self, inputs: Inputs) -> np.ndarray:
        x = np.asarray(inputs["x"])
        if hasattr(self.estimator, "decision_function"):
            scores = np.asarray(self.estimator.decision_function(x), dtype=np.float64)
            if scores.ndim == 1:  # binary: the score is the log-odds of the positive class
                return np.stack([np.zeros_like(scores), scores], axis=1).astype(np.float32)
            return scores.astype(np.float32)
        return np.log(np.clip(self.estimator.predict_proba(x), 1e-7, 1.0)).astype(np.float32)

    def hidden(self, inputs: Inputs) -> None:
        return None

    def serialized(self) -> bytes:
        buffer = io.BytesIO()
        pickle.dump(self.estimator, buffer, protocol=5)
        return buffer.getvalue()

    def size(self) -> dict[str, Any]:
        return {"measure": "serialized-bytes", "value": len(self.serialized())}


class LogitsFileTeacher:
    """Precomputed logits (``.npy`` or an ``.npz`` with a ``logits`` array), aligned row by row with the site's records."""

    kind = "logits-file"

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        loaded = np.load(self.path)
        self._logits = np.asarray(loaded["logits"] if isinstance(loaded, np.lib.npyio.NpzFile) else loaded,
                                  dtype=np.float32)
        if self._logits.ndim != 2:
            raise DataError(f"teacher logits file '{self.path}': expected a 2-D array [records, classes], got shape "
                            f"{self._logits.shape}.")

    def logits(self, inputs: Inputs) -> np.ndarray:
        n = len(next(iter(inputs.values())))
        if n != len(self._logits):
            raise DataError(f"teacher logits file '{self.path}' has {len(self._logits)} rows but the site's training "
                            f"split has {n} records; regenerate the file for this data.")
        return self._logits

    def hidden(self, inputs: Inputs) -> None:
        return None

    def size(self) -> dict[str, Any]:
        return {"measure": "not-applicable", "value": None}


TEACHER_MANIFEST = "fedistill_teacher.json"
TEACHER_MANIFEST_VERSION = 1
POOLED_ENCODER = "pooled-encoder"


def save_pooled_encoder_teacher(directory: Path, encoder_path: Path, head: nn.Linear) -> Path:
    """Write a pooled-encoder teacher as ``directory/`` holding :data:`TEACHER_MANIFEST` and ``head.safetensors``.

    The encoder is referenced by its absolute local path rather than copied: it is a read-only model
    that every site already has installed, and copying 90 MB per run buys nothing.
    """
    directory = Path(directory)
    state = {name: tensor.detach().cpu().contiguous() for name, tensor in head.state_dict().items()}
    atomic_write_bytes(directory / "head.safetensors", save(state))
    # The manifest goes last: a directory that has one is complete.
    atomic_write_json(directory / TEACHER_MANIFEST, {
        "schema_version": TEACHER_MANIFEST_VERSION, "kind": POOLED_ENCODER,
        "encoder": str(Path(encoder_path).resolve()), "head": "head.safetensors",
        "num_classes": int(head.out_features)})
    return directory


def _load_pooled_encoder_teacher(directory: Path) -> TorchTeacher:
    """Read a teacher written by :func:`save_pooled_encoder_teacher`; every problem names the manifest field."""
    from transformers import AutoModel

    manifest = directory / TEACHER_MANIFEST
    try:
        raw = json.loads(manifest.read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(f"teacher manifest '{manifest}' is not valid JSON ({err}); rewrite it with "
                          "save_pooled_encoder_teacher.") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"teacher manifest '{manifest}': expected a JSON object, got {type(raw).__name__}.")
    if raw.get("schema_version") != TEACHER_MANIFEST_VERSION:
        raise ConfigError(f"teacher manifest '{manifest}': field 'schema_version' is {raw.get('schema_version')!r}, "
                          f"expected {TEACHER_MANIFEST_VERSION}.")
    for field_name in ("kind", "encoder", "head", "num_classes"):
        if field_name not in raw:
            raise ConfigError(f"teacher manifest '{manifest}': field '{field_name}' is missing.")
    if raw["kind"] != POOLED_ENCODER:
        raise ConfigError(f"teacher manifest '{manifest}': field 'kind' is {raw['kind']!r}; the only known kind "
                          f"is {POOLED_ENCODER!r}.")
    # Relative paths are read against the teacher directory; an absolute path is kept as it is.
    encoder_path, head_path = directory / str(raw["encoder"]), directory / str(raw["head"])
    if not (encoder_path / "config.json").is_file():
        raise ConfigError(f"teacher manifest '{manifest}': field 'encoder' points at '{encoder_path}', which is not a "
                          "transformers model directory (no config.json); install the model there or fix the path.")
    if not head_path.is_file():
        raise ConfigError(f"teacher manifest '{manifest}': field 'head' points at '{head_path}', which does not exist.")
    try:
        state = load_file(str(head_path))
    except SafetensorError as err:
        raise ConfigError(f"teacher head '{head_path}' is not a readable safetensors file: {err}") from None
    weight, bias = state.get("weight"), state.get("bias")
    if weight is None or bias is None or weight.ndim != 2 or bias.shape != weight.shape[:1]:
        raise ConfigError(f"teacher head '{head_path}' must hold a 'weight' [classes, features] and a 'bias' "
                          f"[classes]; it holds {sorted(state)}.")
    if weight.shape[0] != raw["num_classes"]:
        raise ConfigError(f"teacher manifest '{manifest}': field 'num_classes' is {raw['num_classes']!r} but the head "
                          f"'{head_path}' has {weight.shape[0]} outputs.")
    encoder = AutoModel.from_pretrained(str(encoder_path), local_files_only=True)
    if encoder.config.hidden_size != weight.shape[1]:
        raise ConfigError(f"teacher head '{head_path}' expects {weight.shape[1]} features but the encoder "
                          f"'{encoder_path}' has hidden size {encoder.config.hidden_size}.")
    head = nn.Linear(weight.shape[1], weight.shape[0])
    head.load_state_dict({"weight": weight, "bias": bias})
    return TorchTeacher(PooledEncoderClassifier(encoder, head), keys=TEXT_INPUTS)


def load_teacher(path: Path) -> Teacher:
    """Load a teacher from disk by what the path holds.

    A directory with :data:`TEACHER_MANIFEST` is a pooled-encoder teacher (a frozen encoder plus a linear
    head, see :func:`save_pooled_encoder_teacher`); a directory with ``config.json`` a transformers
    checkpoint; ``.pt``/``.ts`` a TorchScript module; ``.pkl``/``.joblib`` a pickled scikit-learn estimator
    (only load pickles you made yourself: unpickling runs code); ``.npy``/``.npz`` precomputed logits.
    """
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"teacher: '{path}' does not exist; check the teacher path in the site configuration.")
    if path.is_dir():
        if (path / TEACHER_MANIFEST).is_file():
            return _load_pooled_encoder_teacher(path)
        if not (path / "config.json").is_file():
            raise ConfigError(f"teacher: directory '{path}' has neither {TEACHER_MANIFEST} nor config.json (not a "
                              "fedistill teacher or a save_pretrained checkpoint).")
        return TransformersTeacher(path)
    suffix = path.suffix.lower()
    if suffix in (".pt", ".ts"):
        return TorchTeacher(torch.jit.load(str(path)))
    if suffix in (".pkl", ".joblib"):
        with open(path, "rb") as handle:
            return SklearnTeacher(pickle.load(handle))
    if suffix in (".npy", ".npz"):
        return LogitsFileTeacher(path)
    raise ConfigError(f"teacher: cannot tell what '{path}' is; use a checkpoint directory, .pt, .pkl or .npz.")


def save_sklearn_teacher(estimator: Any, path: Path) -> None:
    atomic_write_bytes(Path(path), SklearnTeacher(estimator).serialized())


def teacher_digest(path: Path) -> str:
    """What the teacher-logit cache is keyed by: the teacher's files, plus the encoder a manifest points at."""
    path = Path(path)
    digest = path_digest(path)
    manifest = path / TEACHER_MANIFEST
    if manifest.is_file():
        encoder = json.loads(manifest.read_text()).get("encoder")
        if encoder and (path / str(encoder)).is_dir():
            digest = sha256_hex(digest + path_digest(path / str(encoder)))
    return digest


def path_digest(path: Path) -> str:
    """SHA-256 of a file, or of every file in a directory (relative names and contents, in name order)."""
    path = Path(path)
    h = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for file in files:
        h.update(str(file.relative_to(path) if path.is_dir() else file.name).encode())
        with open(file, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()
