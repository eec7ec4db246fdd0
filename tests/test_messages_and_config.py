import numpy as np
import pytest

from distill.models import build_student, parameter_names, state_to_numpy
from protocols.config import FederationConfig
from protocols.errors import ConfigError, UpdateRejected
from protocols.fragments import fragment_spec_for
from protocols.messages import TrainInstruction, check_fragment_update
from tests.helpers import MLP, federation


def test_instruction_round_trips_through_a_flat_config(tmp_path):
    from coordinator.rounds import Coordinator

    instruction = Coordinator(federation(), "run-1", tmp_path).instruction(1)
    assert instruction.anchor is not None and len(instruction.nonce) == 32
    again = TrainInstruction.from_config(instruction.to_config())
    assert again == instruction


def test_instruction_missing_fields_is_refused():
    with pytest.raises(UpdateRejected, match="missing"):
        TrainInstruction.from_config({"server-round": 1})


def test_update_with_wrong_shape_or_extra_tensor_is_refused_by_name():
    model = build_student(MLP)
    spec = fragment_spec_for("mlp", parameter_names(model))
    state = state_to_numpy(model)
    good = {k: state[k] for k in spec.parameters_of("layers.4")}
    check_fragment_update(good, spec, ("layers.4",), state, "test")
    bad = dict(good, **{"layers.4.bias": np.zeros(7, dtype=np.float32)})
    with pytest.raises(UpdateRejected, match="layers.4.bias"):
        check_fragment_update(bad, spec, ("layers.4",), state, "test")
    with pytest.raises(UpdateRejected, match="layers.0.weight"):
        check_fragment_update(dict(good, **{"layers.0.weight": state["layers.0.weight"]}), spec, ("layers.4",),
                              state, "test")
    with pytest.raises(UpdateRejected, match="non-finite"):
        check_fragment_update(dict(good, **{"layers.4.bias": np.full(2, np.nan, np.float32)}), spec, ("layers.4",),
                              state, "test")
    with pytest.raises(UpdateRejected, match="dtype float64, expected exactly float32"):
        check_fragment_update(dict(good, **{"layers.4.bias": good["layers.4.bias"].astype(np.float64)}), spec,
                              ("layers.4",), state, "test")


@pytest.mark.parametrize("field,value", [("rounds", 0), ("alpha", 1.5), ("fragment_plan", "random"),
                                         ("learning_rate", -1.0), ("optimizer", "lbfgs")])
def test_config_errors_name_the_field(field, value):
    with pytest.raises(ConfigError, match=field):
        federation(**{field: value})


def test_config_hash_is_stable_and_sensitive():
    assert federation().config_hash() == federation().config_hash()
    assert federation().config_hash() != federation(rounds=3).config_hash()
    assert FederationConfig.from_dict(federation().to_dict()) == federation()
