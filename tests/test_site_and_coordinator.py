import numpy as np
import pytest

from client.train import train_round
from coordinator.aggregate import aggregate_fragments
from coordinator.replies import SiteReply
from coordinator.checkpoint import load_student, save_student
from coordinator.rounds import Coordinator, load_metrics
from distill.cache import TeacherLogitCache
from distill.models import build_student, state_to_numpy
from protocols.errors import UpdateRejected
from tests.helpers import TINY_BERT, federation, make_site, plain_reply


def test_site_trains_only_the_planned_fragments_and_reuses_teacher_logits(tmp_path):
    site = make_site(tmp_path)
    coordinator = Coordinator(federation(fragment_plan="cyclic", rounds=3), "run", tmp_path / "run")
    for server_round in (1, 2, 3):
        instruction = coordinator.instruction(server_round)
        update = train_round(site, instruction, coordinator.state)
        assert sorted(update.arrays) == sorted(coordinator.spec.parameters_of_all(instruction.fragments))
        assert update.num_examples == 64 and update.steps == 3
        changed = [k for k in update.arrays if not np.allclose(update.arrays[k], coordinator.state[k])]
        assert changed, "training moved nothing"
    # The teacher ran once, in round 1; rounds 2 and 3 used the cache.
    assert TeacherLogitCache(site.state_dir).teacher_forward_passes == 1


def test_site_refuses_an_instruction_with_an_unknown_fragment(tmp_path):
    site = make_site(tmp_path)
    coordinator = Coordinator(federation(), "run", tmp_path / "run")
    instruction = coordinator.instruction(1)
    bogus = type(instruction)(**{**instruction.__dict__, "fragments": ("layers.9",)})
    with pytest.raises(UpdateRejected, match="layers.9"):
        train_round(site, bogus, coordinator.state)
    truncated = {k: v for k, v in coordinator.state.items() if k != "layers.0.bias"}
    with pytest.raises(UpdateRejected, match="layers.0.bias"):
        train_round(site, instruction, truncated)


def test_fragment_average_is_weighted_and_leaves_untrained_fragments_alone(tmp_path):
    coordinator = Coordinator(federation(), "run", tmp_path)
    state, spec = coordinator.state, coordinator.spec
    head = spec.parameters_of("layers.4")
    a = SiteReply("a", {k: np.ones_like(state[k]) for k in head}, num_examples=1, train_loss=0.1)
    b = SiteReply("b", {k: np.full_like(state[k], 4.0) for k in head}, num_examples=3, train_loss=0.1)
    result = aggregate_fragments(state, spec, ("layers.4",), [a, b], 1)
    for k in head:
        assert np.allclose(result.state[k], 3.25)
    for k in spec.parameters_of("layers.0"):
        assert np.array_equal(result.state[k], state[k])


def test_malformed_update_never_touches_the_student(tmp_path):
    coordinator = Coordinator(federation(), "run", tmp_path)
    state, spec = coordinator.state, coordinator.spec
    nan = plain_reply(coordinator, 1, "bad", {k: np.full_like(state[k], np.nan) for k in spec.parameters_of_all(
        coordinator.instruction(1).fragments)})
    record = coordinator.complete_round(1, [nan], {}, started=0.0)
    assert record["status"] == "failed" and record["student_digest"]
    assert all(np.array_equal(coordinator.state[k], state[k]) for k in state)
    rejection = load_metrics(tmp_path)[0]["rejected"]["bad"]
    assert rejection.startswith("round 1 update from bad") and "non-finite" in rejection


def test_a_secure_aggregate_with_a_non_finite_value_is_rejected_and_the_student_is_unchanged(tmp_path):
    coordinator = Coordinator(federation(), "run", tmp_path)
    before = coordinator.state
    names = coordinator.spec.parameters_of_all(coordinator.instruction(1).fragments)
    vectors = [np.zeros_like(before[name], dtype=np.float64) for name in names] + [np.array([0.5]), np.array([0.1])]
    vectors[0] = vectors[0].copy()
    vectors[0].flat[0] = np.inf
    record = coordinator.complete_secure_round(1, vectors, ["a", "b", "c"], {}, {}, {}, started=0.0)
    assert record["status"] == "failed" and record["participants"] == []
    assert "round 1, fragment 'layers.0'" in record["aggregate_rejected"] and "non-finite" in record["aggregate_rejected"]
    assert all(np.array_equal(coordinator.state[k], before[k]) for k in before)
    assert load_metrics(tmp_path)[0]["aggregate_rejected"] == record["aggregate_rejected"]


def test_a_secure_sum_of_fewer_sites_than_min_cohort_is_not_used(tmp_path):
    coordinator = Coordinator(federation(min_cohort=3), "run", tmp_path)
    before = coordinator.state
    names = coordinator.spec.parameters_of_all(coordinator.instruction(1).fragments)
    vectors = [np.zeros_like(before[name], dtype=np.float64) for name in names] + [np.array([0.5]), np.array([0.1])]
    record = coordinator.complete_secure_round(1, vectors, ["a", "b"], {}, {}, {}, started=0.0)
    assert record["status"] == "failed" and "fewer than min_cohort=3" in record["aggregate_rejected"]
    assert all(np.array_equal(coordinator.state[k], before[k]) for k in before)


def test_an_aggregate_beyond_the_norm_bound_is_rejected(tmp_path):
    coordinator = Coordinator(federation(max_update_norm=1.0), "run", tmp_path)
    state, spec = coordinator.state, coordinator.spec
    far = SiteReply("a", {k: v + 10.0 for k, v in state.items()}, 10, 0.1)
    # aggregate_fragments averages screened replies; it still checks the aggregate on its own.
    result = aggregate_fragments(state, spec, spec.names, [far], 3, max_update_norm=1.0)
    assert result.accepted == [] and "max_update_norm=1" in result.aggregate_rejected
    assert "round 3, fragment 'layers.0'" in result.aggregate_rejected
    assert all(np.array_equal(result.state[k], state[k]) for k in state)


@pytest.mark.parametrize("spec", ["mlp", "bert"])
def test_checkpoint_round_trip_with_config(tmp_path, spec):
    config = federation() if spec == "mlp" else federation(student=TINY_BERT)
    model = build_student(config.student)
    target = tmp_path / "student"
    save_student(model, config.student, target, config)
    save_student(model, config.student, target, config, {"round": 2})  # replacing keeps exactly one checkpoint
    loaded, manifest = load_student(target)
    assert manifest["config_hash"] == config.config_hash() and manifest["round"] == 2
    original, again = state_to_numpy(model), state_to_numpy(loaded)
    assert all(np.allclose(original[k], again[k]) for k in original)
    assert [p.name for p in tmp_path.iterdir()] == ["student"]
    if spec == "bert":
        assert (target / "config.json").is_file()
