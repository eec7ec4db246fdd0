"""The artefacts a serving team gets from a run: the student checked against the ledger, a ``save_pretrained`` folder,
ONNX, int8 and int4 ONNX, and the onnxruntime sessions that run them.

Choices, and why:
- **ONNX** through torch's own exporter (``torch.onnx.export(..., dynamo=True)``, the torch.export path). Parity is
  the largest absolute difference between torch's and onnxruntime's logits on the held-out inputs; an export
  over :data:`ONNX_TOLERANCE` is refused rather than shipped.
- **int8**: onnxruntime's dynamic quantization (``quantize_dynamic``: int8 weights, activations quantized per
  batch at run time). The serving artefact is the ONNX graph. torch's eager ``quantize_dynamic`` warns that
  ``torch.ao.quantization`` is deprecated, and its quantized module fails ``torch.onnx.export`` (measured, torch 2.13).
- **int4**: onnxruntime's weight-only block quantizer (``MatMulNBitsQuantizer``: symmetric 4-bit blocks of 32 with a
  scale each; MatMul -> MatMulNBits, embedding Gather -> GatherBlockQuantized). It does not take Gemm: a tabular MLP's
  layers export as Gemm and stay unquantized, so no int4 file is written for it, and the manifest says so.
  torchao 0.18's int4 weight-only config does not run on CPU here, and optimum-quanto's int4 model does not export
  to ONNX (docs/serving.md has what each one said).
"""

from __future__ import annotations

import json
import logging
import shutil
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from compliance.model_signature import signed_final_student, weights_digest
from coordinator.checkpoint import MANIFEST as CHECKPOINT_MANIFEST, load_student
from distill.data import SplitData, load_splits
from distill.models import TEXT_INPUTS, student_forward, student_state
from distill.vocabulary import vocabulary_of
from protocols.canonical import digest_arrays
from protocols.config import StudentSpec
from protocols.errors import ConfigError, DataError, ExternalToolError, LedgerTampered


ONNX_TOLERANCE = 1e-4
CAUSAL_TRAINABLE = "fedistill/trainable.safetensors"
CAUSAL_PARITY_SEQUENCES = 8
# 21: the first opset with int4 tensors, which the int4 file needs; the fp32 and int8 files use the same one.
ONNX_OPSET = 21
INT4_BLOCK_SIZE = 32
ONNX_DIR = "onnx"
ONNX_FILES = {"fp32": "model.onnx", "int8": "model.int8.onnx", "int4": "model.int4.onnx"}
PARITY_RECORDS = 256


@dataclass
class RunStudent:
    """The final student of a finished run, as its signed ledger vouches for it."""

    run_dir: Path
    run_id: str
    config_hash: str
    spec: StudentSpec
    model: nn.Module
    final: dict[str, Any]
    class_names: list[str]
    feature_names: list[str]

    @property
    def family(self) -> str:
        return self.spec.family


def finished_student(run_dir: Path) -> RunStudent:
    """Load ``student/`` of a finished run; refuses a run without a signed end, a missing checkpoint, or weights whose
    digest is not the one the ledger signed."""
    run_dir = Path(run_dir)
    for path, what in ((run_dir / "config.json", "the run config"), (run_dir / "ledger.jsonl", "the run's ledger"),
                       (run_dir / "ledger_key.pub.pem", "the ledger's public key")):
        if not path.is_file():
            raise ConfigError(f"{path} is missing ({what}): '{run_dir}' is not a fedistill run directory.")
    final = signed_final_student(run_dir / "ledger.jsonl", (run_dir / "ledger_key.pub.pem").read_text())
    checkpoint = run_dir / "student" / CHECKPOINT_MANIFEST
    if not checkpoint.is_file() or not (run_dir / "student" / "model.safetensors").is_file():
        raise ConfigError(f"{run_dir / 'student'}: the final checkpoint is missing (no {CHECKPOINT_MANIFEST} or "
                          "model.safetensors); the run finished but its student was not kept. Nothing to export.")
    model, manifest = load_student(run_dir / "student")
    actual = digest_arrays(student_state(model, manifest["student"]["family"]))
    if actual != final["student_digest"]:
        raise LedgerTampered(f"{run_dir / 'student'}: the student hashes to {actual[:12]}..., not "
                             f"{final['student_digest'][:12]}..., the digest the signed run-finished event records; "
                             "the checkpoint was swapped or damaged. Do not export it.")
    summary_path = run_dir / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    spec = StudentSpec.from_dict(manifest["student"])
    classes = summary.get("class_names") or [str(i) for i in range(_num_classes(spec))]
    features = summary.get("provenance", {}).get("features") or []
    return RunStudent(run_dir, final["run_id"], final["config_hash"], spec, model.eval(), final, list(classes),
                      list(features) if spec.family == "mlp" else [])


def _num_classes(spec: StudentSpec) -> int:
    settings = dict(spec.settings)
    return int(settings.get("num_classes", settings.get("num_labels", 2)))


# --------------------------------------------------------------------------------------------- held-out inputs
@dataclass
class HeldOut:
    """Inputs with labels to score the exported models on, and where they come from."""

    test: SplitData
    validation: SplitData | None
    source: str


def heldout_inputs(run_dir: Path, inputs: Path | None) -> HeldOut | None:
    """``--inputs FILE.npz`` (``test.input.<name>``/``test.labels``, as fedistill's split files), else a simulated
    run's sites' test splits pooled (validation pooled for the decision threshold); None for a deployed run, whose
    coordinator holds no records."""
    if inputs is not None:
        test, validation = _inputs_file(Path(inputs), "test"), _inputs_file(Path(inputs), "val")
        if test is None:
            raise DataError(f"--inputs {inputs}: holds no test split; it needs arrays test.input.<name> (x, or "
                            "input_ids and attention_mask) and test.labels, as numpy.savez writes them.")
        return HeldOut(test, validation, f"{Path(inputs).name}: {len(test)} records")
    files = sorted(Path(run_dir).glob("sites/*/data.npz"))
    if not files:
        return None
    loaded = [load_splits(path) for path in files]
    test = SplitData.concatenate([s["test"] for s in loaded if "test" in s])
    validation = SplitData.concatenate([s["val"] for s in loaded if "val" in s]) if all("val" in s for s in loaded) \
        else None
    return HeldOut(test, validation, f"the {len(files)} simulated sites' test splits, pooled: {len(test)} records")


def _inputs_file(path: Path, split: str) -> SplitData | None:
    if not path.is_file():
        raise DataError(f"--inputs {path} does not exist.")
    try:
        with np.load(path, allow_pickle=False) as archive:
            inputs = {key.split(".input.", 1)[1]: archive[key] for key in archive.files
                      if key.startswith(f"{split}.input.")}
            if not inputs:
                return None
            if f"{split}.labels" not in archive.files:
                raise DataError(f"--inputs {path}: has {split}.input.* but no {split}.labels.")
            return SplitData(inputs, archive[f"{split}.labels"])
    except (OSError, ValueError) as err:
        raise DataError(f"--inputs {path} is not a numpy .npz archive ({err}).") from None


def check_heldout(student: RunStudent, heldout: HeldOut | None) -> None:
    """The held-out records must be what the student reads: named arrays of its input shape."""
    if heldout is None:
        return
    names = input_names(student.family)
    missing = [name for name in names if name not in heldout.test.inputs]
    if missing:
        raise DataError(f"held-out records ({heldout.source}): no test.input.{missing[0]} array; the {student.family} "
                        f"student reads {', '.join(names)}.")
    if student.family == "mlp":
        width, expected = heldout.test.inputs["x"].shape[1:], (int(student.spec.settings["input_dim"]),)
        if tuple(width) != expected:
            raise DataError(f"held-out records ({heldout.source}): test.input.x has {tuple(width)} features per record; "
                            f"the student reads {expected[0]} (in the order of config.json's feature_names).")


def parity_inputs(student: RunStudent, heldout: HeldOut | None) -> dict[str, np.ndarray]:
    """Inputs to compare torch and onnxruntime on: held-out records where there are some, else seeded synthetic
    inputs of the student's shape (a deployed coordinator has no records)."""
    if heldout is not None:
        if student.family == "causal_lm":  # [sequences, length, vocabulary] logits: a few sequences suffice
            return causal_model_ids(student, {k: v[:CAUSAL_PARITY_SEQUENCES] for k, v in heldout.test.inputs.items()})
        return {k: v[:PARITY_RECORDS] for k, v in heldout.test.inputs.items()}
    rng = np.random.default_rng(0)
    settings = dict(student.spec.settings)
    if student.family == "mlp":
        return {"x": rng.standard_normal((PARITY_RECORDS, int(settings["input_dim"]))).astype(np.float32)}
    if student.family == "causal_lm":
        config = student.model.config
        shape = (CAUSAL_PARITY_SEQUENCES, min(int(config.max_position_embeddings), 32))
        return {"input_ids": rng.integers(0, int(config.vocab_size), shape).astype(np.int64),
                "attention_mask": np.ones(shape, dtype=np.int64)}
    length = int(settings.get("max_position_embeddings", 64))
    return {"input_ids": rng.integers(0, int(settings["vocab_size"]), (64, length)).astype(np.int64),
            "attention_mask": np.ones((64, length), dtype=np.int64)}


def causal_model_ids(student: RunStudent, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Held-out texts are in the teacher's ids; a student with a vocabulary subset reads its own."""
    vocabulary = vocabulary_of(student.model)
    if vocabulary is None:
        return inputs
    ids = vocabulary.student_ids(torch.from_numpy(inputs["input_ids"])).numpy()
    return {"input_ids": ids.astype(np.int64), "attention_mask": inputs["attention_mask"]}


# --------------------------------------------------------------------------------------------- save_pretrained
def write_pretrained(student: RunStudent, out: Path, tokenizer: Path | None) -> dict[str, Any]:
    """The student as a ``save_pretrained`` folder at ``out``, with the tensors exactly as the ledger hashed them."""
    if student.family == "mlp":
        from serving.modeling_fedistill_mlp import FedistillMLPConfig, FedistillMLPForSequenceClassification

        settings = dict(student.spec.settings)
        FedistillMLPConfig.register_for_auto_class()
        FedistillMLPForSequenceClassification.register_for_auto_class("AutoModelForSequenceClassification")
        config = FedistillMLPConfig(input_dim=int(settings["input_dim"]), hidden=[int(h) for h in settings["hidden"]],
                                    feature_names=student.feature_names,
                                    num_labels=int(settings["num_classes"]),
                                    id2label=dict(enumerate(student.class_names)),
                                    label2id={name: i for i, name in enumerate(student.class_names)})
        wrapped = FedistillMLPForSequenceClassification(config)
        wrapped.load_state_dict(student.model.state_dict())
        wrapped.save_pretrained(str(out))
        loader = "AutoModelForSequenceClassification.from_pretrained(DIR, trust_remote_code=True)"
    elif student.family == "causal_lm":
        from distill.causal_lm import merged_student

        merged_student(student.model).save_pretrained(str(out))
        # What the ledger hashed: the run's trainable tensors; the merged weights add the digest-pinned base to them.
        (out / CAUSAL_TRAINABLE).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(student.run_dir / "student" / "model.safetensors", out / CAUSAL_TRAINABLE)
        loader = "AutoModelForCausalLM.from_pretrained(DIR)"
    elif student.family == "bert":
        student.model.config.id2label = dict(enumerate(student.class_names))
        student.model.config.label2id = {name: i for i, name in enumerate(student.class_names)}
        student.model.save_pretrained(str(out))
        loader = "AutoModelForSequenceClassification.from_pretrained(DIR)"
    else:
        raise ConfigError(f"export: student family {student.family!r} has no serving export yet.")
    if tokenizer is not None:
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(str(tokenizer), local_files_only=True).save_pretrained(str(out))
    weights = CAUSAL_TRAINABLE if student.family == "causal_lm" else "model.safetensors"
    actual = weights_digest(out / weights)
    if actual != student.final["student_digest"]:
        raise ExternalToolError(f"{out / weights}: the exported tensors hash to {actual[:12]}..., not the run's final "
                                f"student {student.final['student_digest'][:12]}...; the export would not verify. "
                                "Report this as a bug.")
    record = {"folder": ".", "loader": loader, "weights": weights, "tokenizer": tokenizer is not None}
    if student.family == "causal_lm":
        settings = student.spec.causal_lm()
        record |= {"base_digest": settings.base_digest,
                   "weights_note": "model.safetensors is the merged student: the run's digest-pinned base plus the "
                                   f"trainable tensors in {CAUSAL_TRAINABLE}, which the ledger hashed"}
        if vocabulary_of(student.model) is not None:
            record["input_ids"] = ("student ids: the tokenizer's id t is config.json's fedistill_student.vocabulary."
                                   "teacher_ids.index(t), and any other id is <oov> (the last id)")
    return record


def default_tokenizer(run_dir: Path, student: RunStudent) -> Path | None:
    """A text student reads its teacher's token ids: the tokenizer is a pooled-encoder teacher's encoder folder's, a
    causal-LM teacher folder's, or else the causal-LM base student's."""
    if student.family == "mlp":
        return None
    candidates = []
    for manifest in sorted(Path(run_dir).glob("teacher/**/fedistill_teacher.json")):
        encoder = Path(json.loads(manifest.read_text()).get("encoder", ""))
        candidates.append(encoder if encoder.is_absolute() else manifest.parent / encoder)
    candidates += sorted(p for p in Path(run_dir).glob("teacher/*") if p.is_dir())
    if student.family == "causal_lm":
        candidates.append(Path(student.spec.causal_lm().base))
    return next((c for c in candidates if (c / "tokenizer_config.json").is_file() or (c / "tokenizer.json").is_file()),
                None)


# --------------------------------------------------------------------------------------------- ONNX
class _TabularLogits(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return student_forward(self.model, "mlp", {"x": x})[0]


class _TextLogits(nn.Module):
    """The classifier called as it is trained (contiguous positions, one segment), returning only its logits."""

    def __init__(self, model: nn.Module, family: str) -> None:
        super().__init__()
        self.model, self.family = model, family

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return student_forward(self.model, self.family, {"input_ids": input_ids, "attention_mask": attention_mask})[0]


class _CausalLogits(nn.Module):
    """Next-token logits [batch, length, vocabulary] of the student's own ids, positions 0..length-1 per sequence."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        from distill.causal_train import causal_logits

        return causal_logits(self.model, input_ids, attention_mask)


def logits_module(student: RunStudent) -> nn.Module:
    if student.family == "mlp":
        return _TabularLogits(student.model).eval()
    if student.family == "causal_lm":
        from distill.causal_lm import merged_student

        return _CausalLogits(merged_student(student.model)).eval()
    return _TextLogits(student.model, student.family).eval()


def input_names(family: str) -> tuple[str, ...]:
    return ("x",) if family == "mlp" else TEXT_INPUTS


def export_onnx(student: RunStudent, path: Path, sample: dict[str, np.ndarray]) -> dict[str, Any]:
    """ONNX of the student's logits, batch (and sequence) dynamic, through torch.export."""
    names = input_names(student.family)
    args = tuple(torch.from_numpy(sample[name][:2]) for name in names)
    batch = torch.export.Dim("batch")
    shapes = tuple({0: batch} if student.family == "mlp" else {0: batch, 1: torch.export.Dim("sequence")}
                   for _ in names)
    path.parent.mkdir(parents=True, exist_ok=True)
    # The exporter reports torchvision's absent ops and its own deprecations: nothing a serving team acts on.
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(logits_module(student), args, input_names=list(names),
                                        output_names=["logits"], dynamic_shapes=shapes, dynamo=True, verbose=False,
                                        opset_version=ONNX_OPSET)
    except Exception as err:  # torch.export's errors have no common base: any of them means no ONNX file
        raise ExternalToolError(f"torch.onnx.export could not export the {student.family} student: "
                                f"{type(err).__name__}: {str(err)[:300]}") from None
    program.save(str(path))
    import onnx

    model = onnx.load(str(path))
    opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    return {"file": f"{ONNX_DIR}/{path.name}", "exporter": f"torch.onnx.export (dynamo=True), torch {torch.__version__}",
            "opset": int(opset), "inputs": list(names), "outputs": ["logits"]}


def onnx_session(path: Path, threads: int | None = None):
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads is not None:
        options.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def onnx_logits(session, inputs: dict[str, np.ndarray], batch_size: int = 256) -> np.ndarray:
    names = [i.name for i in session.get_inputs()]
    n = len(inputs[names[0]])
    return np.concatenate([session.run(["logits"], {k: inputs[k][i:i + batch_size] for k in names})[0]
                           for i in range(0, n, batch_size)])


@torch.no_grad()
def torch_logits(student: RunStudent, inputs: dict[str, np.ndarray], batch_size: int = 256) -> np.ndarray:
    names = input_names(student.family)
    n = len(inputs[names[0]])
    module = logits_module(student)
    return np.concatenate([module(*(torch.from_numpy(inputs[k][i:i + batch_size]) for k in names)).numpy()
                           for i in range(0, n, batch_size)])


def classifier_quality(heldout: HeldOut, test_logits: np.ndarray,
                       validation_logits: Callable[[], np.ndarray | None]) -> dict[str, Any]:
    """Held-out metrics as the run computes them: for a binary task the decision threshold is chosen on the
    validation logits (``validation_logits`` is called only then)."""
    from distill.evaluate import choose_threshold, classification_metrics, softmax

    probabilities = softmax(test_logits.astype(np.float64))
    threshold = None
    if probabilities.shape[1] == 2 and heldout.validation is not None:
        validation = validation_logits()
        if validation is not None:
            threshold = choose_threshold(heldout.validation.labels, softmax(validation.astype(np.float64))[:, 1])
    return classification_metrics(heldout.test.labels, probabilities, threshold)


def causal_quality(student: RunStudent, inputs: dict[str, np.ndarray], session=None) -> dict[str, Any]:
    """Held-out perplexity over the teacher's full vocabulary (distill.causal_train.score_tokens) of the student, or of
    an onnxruntime session of it."""
    from distill.causal_train import causal_logits, score_tokens

    def exported(_model: nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(session.run(["logits"], {"input_ids": ids.numpy().astype(np.int64),
                                                         "attention_mask": mask.numpy().astype(np.int64)})[0])

    scores = score_tokens(student.model, inputs["input_ids"], inputs["attention_mask"], 8,
                          causal_logits if session is None else exported)
    return {"perplexity": scores.perplexity, "nll": float(scores.nll.mean()), "tokens": scores.tokens}


def _without_value_info(path: Path, out: Path) -> Path:
    """A copy without the exporter's intermediate shape annotations: onnxruntime's quantizers re-run shape
    inference, which fails on the dynamic-shape annotations torch.export writes (a known mismatch on Reshape)."""
    import onnx

    model = onnx.load(str(path))
    del model.graph.value_info[:]
    onnx.save(model, str(out))
    return out


def quantize_int8(fp32: Path, out: Path) -> dict[str, Any]:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    staging = _without_value_info(fp32, out.with_suffix(".staging.onnx"))
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # its advice to pre-process is for static quantization, not this
    try:
        quantize_dynamic(str(staging), str(out), weight_type=QuantType.QInt8)
    finally:
        root.setLevel(level)
        staging.unlink(missing_ok=True)
    return {"file": f"{ONNX_DIR}/{out.name}", "method": "onnxruntime quantize_dynamic: int8 weights (QInt8), "
            "activations quantized per batch at run time", "library": f"onnxruntime {version('onnxruntime')}"}


def quantize_int4(fp32: Path, out: Path) -> dict[str, Any]:
    """Weight-only int4 of every MatMul with a constant weight; None-like record when there is none to quantize."""
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer

    model = onnx.load(str(_without_value_info(fp32, out.with_suffix(".staging.onnx"))))
    out.with_suffix(".staging.onnx").unlink(missing_ok=True)
    # MatMul weights in blocks along their input axis; an embedding table (Gather) in blocks along its hidden axis.
    config = DefaultWeightOnlyQuantConfig(block_size=INT4_BLOCK_SIZE, is_symmetric=True,
                                          op_types_to_quantize=("MatMul", "Gather"),
                                          quant_axes=(("MatMul", 0), ("Gather", 1)))
    quantizer = MatMulNBitsQuantizer(model, algo_config=config)
    logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer").setLevel(logging.WARNING)
    quantizer.process()
    nodes = [n.op_type for n in quantizer.model.model.graph.node]
    quantized, left = nodes.count("MatMulNBits"), nodes.count("MatMul") + nodes.count("Gemm")
    record = {"method": f"onnxruntime MatMulNBitsQuantizer: weight-only, symmetric int4 blocks of {INT4_BLOCK_SIZE} "
                        "(MatMul weights and embedding tables)",
              "library": f"onnxruntime {version('onnxruntime')}", "matmuls_quantized": quantized,
              "matmuls_left_in_fp32": left, "embeddings_quantized": nodes.count("GatherBlockQuantized")}
    if quantized == 0:
        return record | {"file": None, "skipped": "no MatMul with a constant weight to quantize (the layers export "
                                                  "as Gemm); an int4 file would be the fp32 model"}
    quantizer.model.save_model_to_file(str(out), use_external_data_format=False)
    return record | {"file": f"{ONNX_DIR}/{out.name}"}


def max_abs_difference(reference: np.ndarray, other: np.ndarray) -> float:
    return float(np.max(np.abs(reference.astype(np.float64) - other.astype(np.float64))))


def check_parity(reference: np.ndarray, exported: np.ndarray, what: str) -> float:
    """The exported model's largest logit difference; over :data:`ONNX_TOLERANCE` is an export that is refused."""
    if exported.shape != reference.shape or not np.all(np.isfinite(exported)):
        raise ExternalToolError(f"{what}: onnxruntime returned logits of shape {exported.shape} (finite: "
                                f"{bool(np.all(np.isfinite(exported)))}), torch {reference.shape}; the export is broken.")
    difference = max_abs_difference(reference, exported)
    if difference > ONNX_TOLERANCE:
        raise ExternalToolError(f"{what}: onnxruntime's logits differ from torch's by up to {difference:.2e}, over the "
                                f"tolerance {ONNX_TOLERANCE:.0e}; the ONNX file is not written as the student.")
    return difference

