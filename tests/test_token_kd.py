import copy
import io

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from distill.token_kd import (DEFAULT_TEMPERATURES, TokenKDLoss, TopKTargets, build_topk_targets,
                              chunked_token_kd_loss, concatenate_targets, divergence, token_kd_loss)
from protocols.errors import ConfigError

VOCAB = 11
DIVERGENCES = [("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.5), ("jsd", 0.1)]


def batch(vocab: int = VOCAB, seed: int = 0, lengths: tuple[int, ...] = (5, 3, 6), seq: int = 6,
          left_padding: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Teacher logits, student logits, input ids and an attention mask with the given real lengths."""
    generator = torch.Generator().manual_seed(seed)
    shape = (len(lengths), seq, vocab)
    teacher = 3.0 * torch.randn(shape, generator=generator, dtype=torch.float64).float()
    student = 3.0 * torch.randn(shape, generator=generator, dtype=torch.float64).float()
    ids = torch.randint(0, vocab, shape[:2], generator=generator)
    mask = torch.zeros(shape[:2], dtype=torch.long)
    for row, length in enumerate(lengths):
        if left_padding:
            mask[row, seq - length:] = 1
        else:
            mask[row, :length] = 1
    return teacher, student, ids, mask


def k_plus_one(logits: np.ndarray, top: np.ndarray, temperature: float) -> np.ndarray:
    """Brute force in float64: probabilities of the given top ids, then of everything else."""
    scaled = logits.astype(np.float64) / temperature
    probs = np.exp(scaled - scaled.max())
    probs /= probs.sum()
    chosen = probs[top]
    return np.append(chosen, 1.0 - chosen.sum()) if len(top) < len(logits) else chosen


def brute_divergence(p: np.ndarray, q: np.ndarray, kind: str, beta: float) -> float:
    """D between student p and teacher q on the k + 1 outcomes, from the definitions."""
    def kl(a: np.ndarray, b: np.ndarray) -> float:
        return float(np.sum(a * np.log(a / b)))
    if kind == "forward_kl":
        return kl(q, p)
    if kind == "reverse_kl":
        return kl(p, q)
    mixture = beta * q + (1 - beta) * p
    return (beta * kl(q, mixture) + (1 - beta) * kl(p, mixture)) / (beta * (1 - beta))


@pytest.mark.parametrize(("kind", "beta"), DIVERGENCES)
def test_student_equal_to_teacher_gives_zero_loss_and_zero_gradient(kind, beta):
    teacher, _, ids, mask = batch()
    for k in (VOCAB, 4):
        targets = build_topk_targets(teacher, mask, k, logit_dtype=np.float32)
        student = teacher.clone().requires_grad_(True)
        loss = token_kd_loss(student, targets, ids, mask, temperature=2.0, alpha=0.0, divergence_kind=kind, beta=beta)
        loss.sum().backward()
        assert loss.abs().max() < 1e-5
        assert student.grad.abs().max() < 1e-5


@pytest.mark.parametrize("temperature", [1.0, 2.0, 10.0])
def test_k_equal_to_vocab_is_the_full_vocabulary_kl(temperature):
    teacher, student, ids, mask = batch()
    targets = build_topk_targets(teacher, mask, VOCAB, logit_dtype=np.float32)
    assert not targets.has_tail and targets.teacher_log_probs(temperature).shape[-1] == VOCAB
    real = mask.bool()
    t_log = F.log_softmax(teacher[real] / temperature, -1)
    s_log = F.log_softmax(student[real] / temperature, -1)
    forward = F.kl_div(s_log, t_log, reduction="none", log_target=True).sum(-1)
    reverse = F.kl_div(t_log, s_log, reduction="none", log_target=True).sum(-1)
    sequence = real.nonzero()[:, 0]
    for kind, per_token in (("forward_kl", forward), ("reverse_kl", reverse)):
        expected = torch.zeros(3).index_add(0, sequence, per_token) / real.sum(1) * temperature ** 2
        loss = token_kd_loss(student, targets, ids, mask, temperature, alpha=0.0, divergence_kind=kind)
        assert torch.allclose(loss, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(("kind", "beta"), DIVERGENCES)
@pytest.mark.parametrize("k", [1, 3, 8])
def test_small_k_with_tail_bucket_matches_brute_force(kind, beta, k):
    temperature = 2.5  # on the default grid: the teacher's tail is exact there
    teacher, student, ids, mask = batch(seed=k)
    targets = build_topk_targets(teacher, mask, k, logit_dtype=np.float32)
    loss = token_kd_loss(student, targets, ids, mask, temperature, alpha=0.0, divergence_kind=kind, beta=beta)
    expected = []
    for row in range(3):
        positions = mask[row].nonzero()[:, 0]
        values = []
        for position in positions:
            t, s = teacher[row, position].numpy(), student[row, position].numpy()
            top = np.argsort(-t, kind="stable")[:k]
            p, q = k_plus_one(s, top, temperature), k_plus_one(t, top, temperature)
            values.append(brute_divergence(p, q, kind, beta))
        expected.append(np.mean(values) * temperature ** 2)
    np.testing.assert_allclose(loss.detach().numpy(), expected, rtol=2e-4)


def test_teacher_tail_mass_is_what_lies_outside_the_top_k():
    teacher, _, _, mask = batch(vocab=50)
    targets = build_topk_targets(teacher, mask, 5, logit_dtype=np.float32)
    rows = teacher[mask.bool()]
    for temperature in (1.0, 10.0 / 3.0, 10.0):
        probs = F.softmax(rows.double() / temperature, -1)
        outside = 1.0 - probs.gather(-1, torch.from_numpy(targets.token_ids.astype(np.int64))).sum(-1)
        tail = targets.teacher_log_probs(temperature)[:, -1].double().exp()
        assert torch.allclose(tail, outside, rtol=1e-5, atol=1e-7)


def test_jsd_tends_to_the_two_kls_at_its_limits():
    generator = torch.Generator().manual_seed(1)
    student = F.log_softmax(torch.randn(20, 6, generator=generator, dtype=torch.float64), -1)
    teacher = F.log_softmax(torch.randn(20, 6, generator=generator, dtype=torch.float64), -1)
    forward, reverse = divergence(student, teacher, "forward_kl"), divergence(student, teacher, "reverse_kl")
    assert torch.equal(divergence(student, teacher, "jsd", 0.0), forward)
    assert torch.equal(divergence(student, teacher, "jsd", 1.0), reverse)
    # The gap closes linearly in beta (and in 1 - beta): the next term of the expansion is first order.
    for epsilon in (1e-3, 1e-4, 1e-6):
        assert torch.allclose(divergence(student, teacher, "jsd", epsilon), forward, rtol=20 * epsilon, atol=0.0)
        assert torch.allclose(divergence(student, teacher, "jsd", 1 - epsilon), reverse, rtol=20 * epsilon, atol=0.0)
    # At beta = 1/2 it is the classic Jensen-Shannon divergence, times 4.
    p, q = student.exp(), teacher.exp()
    m = 0.5 * (p + q)
    classic = 0.5 * (p * (p / m).log()).sum(-1) + 0.5 * (q * (q / m).log()).sum(-1)
    assert torch.allclose(divergence(student, teacher, "jsd", 0.5), 4 * classic)


@pytest.mark.parametrize(("kind", "beta"), DIVERGENCES)
def test_one_loss_per_sequence_over_its_real_tokens_only(kind, beta):
    teacher, student, ids, mask = batch()
    targets = build_topk_targets(teacher, mask, 3)
    loss = token_kd_loss(student, targets, ids, mask, 2.0, alpha=0.3, divergence_kind=kind, beta=beta)
    assert loss.shape == (3,)
    # Whatever sits at padded positions changes nothing, in the student's logits or in the input ids.
    noisy_student, noisy_ids = student.clone(), ids.clone()
    noisy_student[~mask.bool()] = 100.0 * torch.randn(int((~mask.bool()).sum()), VOCAB)
    noisy_ids[~mask.bool()] = 0
    assert torch.allclose(token_kd_loss(noisy_student, targets, noisy_ids, mask, 2.0, 0.3, kind, beta), loss)
    # Each sequence's loss is its own: the same as in a batch of one, with any padding on either side.
    for row in range(3):
        length = int(mask[row].sum())
        alone = token_kd_loss(student[row:row + 1, :length], targets.select([row]), ids[row:row + 1, :length],
                              mask[row:row + 1, :length], 2.0, 0.3, kind, beta)
        assert torch.allclose(alone, loss[row:row + 1], rtol=1e-5)
    shifted = torch.zeros_like(student)
    shifted_ids, left_mask = torch.zeros_like(ids), torch.zeros_like(mask)
    for row in range(3):
        length = int(mask[row].sum())
        shifted[row, 6 - length:], shifted_ids[row, 6 - length:] = student[row, :length], ids[row, :length]
        left_mask[row, 6 - length:] = 1
        teacher_row = teacher[row, :length].clone()
        teacher[row] = 0.0
        teacher[row, 6 - length:] = teacher_row
    left_targets = build_topk_targets(teacher, left_mask, 3)
    left = token_kd_loss(shifted, left_targets, shifted_ids, left_mask, 2.0, 0.3, kind, beta)
    assert torch.allclose(left, loss, rtol=1e-5)


def test_hard_target_is_next_token_cross_entropy_mixed_by_alpha():
    teacher, student, ids, mask = batch()
    targets = build_topk_targets(teacher, mask, 3)
    ce = token_kd_loss(student, targets, ids, mask, 4.0, alpha=1.0)
    expected = []
    for row in range(3):
        length = int(mask[row].sum())
        expected.append(F.cross_entropy(student[row, :length - 1], ids[row, 1:length]))
    assert torch.allclose(ce, torch.stack(expected), rtol=1e-5)
    kd = token_kd_loss(student, targets, ids, mask, 4.0, alpha=0.0)
    assert torch.allclose(token_kd_loss(student, targets, ids, mask, 4.0, alpha=0.25), 0.25 * ce + 0.75 * kd)
    # T^2 scaling: the KD term is 16 x the plain divergence at T = 4.
    plain = divergence(F.log_softmax(torch.cat([
        student[mask.bool()].gather(-1, torch.from_numpy(targets.token_ids.astype(np.int64))) / 4.0,
        student[mask.bool()].scatter(-1, torch.from_numpy(targets.token_ids.astype(np.int64)), float("-inf"))
        .div(4.0).logsumexp(-1, keepdim=True)], -1), -1), targets.teacher_log_probs(4.0), "forward_kl")
    per_sequence = torch.zeros(3).index_add(0, mask.bool().nonzero()[:, 0], plain) / mask.sum(1)
    assert torch.allclose(kd, 16.0 * per_sequence, rtol=1e-5)


@pytest.mark.parametrize(("kind", "beta"), DIVERGENCES)
def test_hand_written_backward_matches_finite_differences(kind, beta):
    teacher, student, ids, mask = batch(vocab=7, lengths=(3, 2), seq=3)
    student = student.double().requires_grad_(True)
    for k in (2, 7):
        targets = build_topk_targets(teacher, mask, k)
        for chunk in (None, 2):
            assert torch.autograd.gradcheck(
                lambda s: token_kd_loss(s, targets, ids, mask, 1.7, 0.3, kind, beta, chunk_size=chunk), (student,),
                fast_mode=True)


def test_a_student_tail_far_below_its_top_k_is_still_exact():
    teacher, _, ids, mask = batch(vocab=30)
    targets = build_topk_targets(teacher, mask, 4, logit_dtype=np.float32)
    student = torch.zeros(3, 6, 30)
    top = torch.from_numpy(targets.token_ids.astype(np.int64))
    rows = student[mask.bool()].scatter(-1, top, 150.0)  # exp(-150) underflows float32: the tail sum is 0
    student[mask.bool()] = rows
    student.requires_grad_(True)
    loss = token_kd_loss(student, targets, ids, mask, 1.0, 0.0)
    loss.sum().backward()
    assert bool(torch.isfinite(student.grad).all())
    # By hand: log p(tail) = log(26) + 0 - log(4 exp(150) + 26), in float64 and log space.
    exact = rows.double()
    log_p = F.log_softmax(torch.cat([exact.gather(-1, top),
                                     exact.scatter(-1, top, float("-inf")).logsumexp(-1, keepdim=True)], -1), -1)
    log_q = targets.teacher_log_probs(1.0).double()
    per_token = (log_q.exp() * (log_q - log_p)).sum(-1)
    expected = torch.zeros(3, dtype=torch.float64).index_add(0, mask.bool().nonzero()[:, 0], per_token) / mask.sum(1)
    assert torch.allclose(loss.double(), expected, rtol=1e-5)


def test_gradient_flows_only_through_the_student():
    teacher, student, ids, mask = batch()
    teacher.requires_grad_(True)
    targets = build_topk_targets(teacher, mask, 3)
    assert isinstance(targets.logits, np.ndarray)  # the cache holds no graph back to the teacher
    student.requires_grad_(True)
    token_kd_loss(student, targets, ids, mask, 2.0, alpha=0.5).sum().backward()
    assert teacher.grad is None
    assert student.grad[mask.bool()].abs().sum() > 0
    assert student.grad[~mask.bool()].abs().sum() == 0
    # Sequence 0's loss does not reach sequence 1's logits: per-sample gradients are per document.
    student.grad = None
    token_kd_loss(student, targets, ids, mask, 2.0, alpha=0.5)[0].backward()
    assert student.grad[1:].abs().sum() == 0


def test_cache_round_trips_through_numpy_and_selects_and_concatenates():
    teacher, student, ids, mask = batch(vocab=40)
    targets = build_topk_targets(teacher, mask, 6)
    arrays = targets.to_arrays()
    assert (arrays["token_ids"].dtype, arrays["logits"].dtype, arrays["tail_logits"].dtype) == \
        (np.int32, np.float16, np.float32)
    assert len(arrays["positions"]) == int(mask.sum())  # padded positions are not stored
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    buffer.seek(0)
    with np.load(buffer) as archive:
        restored = TopKTargets.from_arrays(archive)
    for name, value in arrays.items():
        assert np.array_equal(restored.to_arrays()[name], value)
    assert torch.equal(token_kd_loss(student, restored, ids, mask, 3.0, 0.5),
                       token_kd_loss(student, targets, ids, mask, 3.0, 0.5))
    parts = [build_topk_targets(teacher[i:i + 1], mask[i:i + 1], 6) for i in range(3)]
    joined = concatenate_targets(parts)
    for name, value in arrays.items():
        assert np.array_equal(joined.to_arrays()[name], value)
    picked = targets.select([2, 0])
    assert np.array_equal(picked.to_arrays()["positions"], np.concatenate([np.arange(6), np.arange(5)]))
    assert torch.allclose(token_kd_loss(student[[2, 0]], picked, ids[[2, 0]], mask[[2, 0]], 3.0, 0.5),
                          token_kd_loss(student, targets, ids, mask, 3.0, 0.5)[[2, 0]])
    damaged = dict(arrays, token_ids=arrays["token_ids"].astype(np.int64))
    with pytest.raises(ValueError, match="int32"):
        TopKTargets.from_arrays(damaged)


def heavy_tailed_logits(positions: int, vocab: int, seed: int) -> torch.Tensor:
    """LM-like rows: a few likely tokens over a long Gumbel-distributed tail, with a varying sharpness."""
    generator = torch.Generator().manual_seed(seed)
    gumbel = -torch.log(-torch.log(torch.rand(positions, vocab, generator=generator)))
    sharpness = 1.0 + 3.0 * torch.rand(positions, 1, generator=generator)
    return sharpness * gumbel


def test_re_tempering_error_off_the_grid_is_small_and_bounded_by_the_chord():
    vocab, k = 4096, 16
    logits = heavy_tailed_logits(64, vocab, seed=3)
    mask = torch.ones(1, 64, dtype=torch.long)
    targets = build_topk_targets(logits.unsqueeze(0), mask, k, logit_dtype=np.float32)
    ids = torch.from_numpy(targets.token_ids.astype(np.int64))
    betas = targets.inverse_temperatures
    worst_grid, worst_t1 = 0.0, 0.0
    for low, high in zip(betas, betas[1:]):
        temperature = 2.0 / (low + high)  # the midpoint in 1/T, where the chord is furthest off
        log_probs = F.log_softmax(logits.double() / temperature, -1)
        exact = torch.cat([log_probs.gather(-1, ids), log_probs.scatter(-1, ids, float("-inf"))
                           .logsumexp(-1, keepdim=True)], -1)
        cached = targets.teacher_log_probs(temperature).double()
        # The chord overestimates the tail (convexity), so the cached distribution stays valid.
        assert bool((cached[:, -1] >= exact[:, -1] - 1e-6).all())
        worst_grid = max(worst_grid, float(F.kl_div(cached, exact, reduction="none", log_target=True).sum(-1).max()))
        # A cache at T = 1 re-tempered as k + 1 logits treats the tail as one token: far worse at high T.
        at_one = targets.teacher_log_probs(1.0).double()
        naive = F.log_softmax(at_one / temperature, -1)
        worst_t1 = max(worst_t1, float(F.kl_div(naive, exact, reduction="none", log_target=True).sum(-1).max()))
    assert worst_grid < 1e-3
    assert worst_t1 > 100 * worst_grid


def test_float16_logits_cost_little():
    logits = heavy_tailed_logits(64, 2048, seed=4).unsqueeze(0)
    mask = torch.ones(1, 64, dtype=torch.long)
    half = build_topk_targets(logits, mask, 32)
    full = build_topk_targets(logits, mask, 32, logit_dtype=np.float32)
    assert half.logits.nbytes * 2 == full.logits.nbytes
    for temperature in (1.0, 10.0):
        kl = F.kl_div(half.teacher_log_probs(temperature), full.teacher_log_probs(temperature),
                      reduction="none", log_target=True).sum(-1)
        assert float(kl.max()) < 1e-5


@pytest.mark.parametrize(("kind", "beta"), [("forward_kl", 0.5), ("jsd", 0.3)])
def test_chunked_loss_from_hidden_states_equals_the_materialised_one(kind, beta):
    _, _, ids, mask = batch(vocab=300, lengths=(7, 2, 5, 1), seq=7)
    generator = torch.Generator().manual_seed(5)
    hidden = torch.randn(4, 7, 16, generator=generator, requires_grad=True)
    head = nn.Linear(16, 300, bias=False).requires_grad_(False)
    teacher = 4.0 * torch.randn(4, 7, 300, generator=generator)
    targets = build_topk_targets(teacher, mask, 10)
    full = token_kd_loss(head(hidden), targets, ids, mask, 3.0, 0.4, kind, beta)
    (full_grad,) = torch.autograd.grad(full.sum(), hidden)
    for chunk in (1, 4, 64):
        chunked = chunked_token_kd_loss(hidden, head, targets, ids, mask, 3.0, 0.4, kind, beta, chunk_size=chunk)
        (grad,) = torch.autograd.grad(chunked.sum(), hidden)
        assert torch.allclose(chunked, full, rtol=1e-5, atol=1e-6)
        assert torch.allclose(grad, full_grad, rtol=1e-4, atol=1e-6)
    logits = head(hidden)
    chunked_logits = token_kd_loss(logits, targets, ids, mask, 3.0, 0.4, kind, beta, chunk_size=3)
    assert torch.allclose(chunked_logits, full, rtol=1e-5)
    # Ghost clipping backpropagates twice through the same graph (retain_graph on the first pass).
    chunked = chunked_token_kd_loss(hidden, head, targets, ids, mask, 3.0, 0.4, kind, beta, chunk_size=4)
    first = torch.autograd.grad(chunked.mean(), hidden, retain_graph=True)[0]
    second = torch.autograd.grad((2.0 * chunked).sum(), hidden)[0]
    assert torch.allclose(second, 2.0 * 4 * first, rtol=1e-4, atol=1e-6)


@pytest.mark.filterwarnings("ignore:Full backward hook is firing")
def test_opacus_per_sample_gradients_are_per_sequence():
    from opacus import GradSampleModule
    _, _, ids, mask = batch(vocab=64, lengths=(6, 3, 5), seq=6)
    generator = torch.Generator().manual_seed(6)
    torch.manual_seed(6)
    body = nn.Linear(8, 8)
    head = nn.Linear(8, 64, bias=False).requires_grad_(False)  # the frozen output layer
    inputs = torch.randn(3, 6, 8, generator=generator)
    targets = build_topk_targets(4.0 * torch.randn(3, 6, 64, generator=generator), mask, 5)
    reference = copy.deepcopy(body)  # outside Opacus's hooks
    private = GradSampleModule(body, loss_reduction="sum")
    loss = chunked_token_kd_loss(private(inputs), head, targets, ids, mask, 2.0, 0.5, "reverse_kl", chunk_size=4)
    criterion = TokenKDLoss(2.0, 0.5, "reverse_kl", reduction="none")
    assert torch.allclose(loss, criterion(head(reference(inputs)), targets, ids, mask), rtol=1e-5)
    loss.sum().backward()
    for row in range(3):
        alone = chunked_token_kd_loss(reference(inputs[row:row + 1]), head, targets.select([row]), ids[row:row + 1],
                                      mask[row:row + 1], 2.0, 0.5, "reverse_kl", chunk_size=4)
        expected = torch.autograd.grad(alone.sum(), reference.weight)[0]
        assert torch.allclose(body.weight.grad_sample[row], expected, rtol=1e-4, atol=1e-7)


@pytest.mark.filterwarnings("ignore:Full backward hook is firing")
def test_opacus_ghost_clipping_clips_each_sequence():
    from opacus.grad_sample import GradSampleModuleFastGradientClipping
    from opacus.optimizers import DPOptimizerFastGradientClipping
    from opacus.utils.fast_gradient_clipping_utils import DPLossFastGradientClipping
    _, _, ids, mask = batch(vocab=64, lengths=(6, 3, 5), seq=6)
    generator = torch.Generator().manual_seed(7)
    torch.manual_seed(7)
    body, head = nn.Linear(8, 8), nn.Linear(8, 64, bias=False).requires_grad_(False)
    inputs = torch.randn(3, 6, 8, generator=generator)
    targets = build_topk_targets(4.0 * torch.randn(3, 6, 64, generator=generator), mask, 5)
    per_sequence = []
    for row in range(3):
        alone = token_kd_loss(head(body(inputs[row:row + 1])), targets.select([row]), ids[row:row + 1],
                              mask[row:row + 1], 2.0, 0.5, "jsd", 0.3)
        per_sequence.append(torch.autograd.grad(alone.sum(), [body.weight, body.bias]))
    norms = [float(torch.cat([g.flatten() for g in grads]).norm()) for grads in per_sequence]
    clip = 0.5 * min(norms)  # every sequence's gradient gets clipped
    model = GradSampleModuleFastGradientClipping(body, max_grad_norm=clip, use_ghost_clipping=True)
    optimizer = DPOptimizerFastGradientClipping(torch.optim.SGD(body.parameters(), lr=1.0), noise_multiplier=0.0,
                                                max_grad_norm=clip, expected_batch_size=3)
    # Chunked (the eager-gradient path) so that both of ghost clipping's backward passes run through it.
    criterion = DPLossFastGradientClipping(model, optimizer, TokenKDLoss(2.0, 0.5, "jsd", 0.3, chunk_size=4))
    criterion(head(model(inputs)), targets, ids, mask).backward()
    for index, parameter in enumerate((body.weight, body.bias)):
        expected = sum(grads[index] * clip / (norm + 1e-6) for grads, norm in zip(per_sequence, norms))
        assert torch.allclose(parameter.grad, expected, rtol=1e-4, atol=1e-7)


def test_bad_settings_and_mismatched_targets_are_refused():
    teacher, student, ids, mask = batch()
    targets = build_topk_targets(teacher, mask, 3)
    with pytest.raises(ConfigError, match="outside"):
        token_kd_loss(student, targets, ids, mask, 20.0, 0.5)
    with pytest.raises(ConfigError, match="divergence"):
        token_kd_loss(student, targets, ids, mask, 2.0, 0.5, divergence_kind="tvd")
    with pytest.raises(ConfigError, match="top-k"):
        build_topk_targets(teacher, mask, VOCAB + 1)
    with pytest.raises(ValueError, match="positions"):
        token_kd_loss(student, targets.select([1, 0, 2]), ids, mask, 2.0, 0.5)
    with pytest.raises(ValueError, match="outputs"):
        token_kd_loss(student[..., :-1], targets, ids, mask, 2.0, 0.5)
    with pytest.raises(ValueError, match="frozen"):
        chunked_token_kd_loss(torch.randn(3, 6, 4), nn.Linear(4, VOCAB), targets, ids, mask, 2.0, 0.5)
    assert min(DEFAULT_TEMPERATURES) == 1.0 and max(DEFAULT_TEMPERATURES) == 10.0
