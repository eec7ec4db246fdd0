import pytest

from distill.models import build_student, parameter_names
from protocols.errors import ConfigError, UpdateRejected
from protocols.fragments import fragment_spec_for, planned_fragments
from tests.helpers import MLP, TINY_BERT


@pytest.mark.parametrize("spec", [MLP, TINY_BERT], ids=["mlp", "bert"])
def test_every_parameter_belongs_to_exactly_one_fragment(spec):
    names = parameter_names(build_student(spec))
    fragments = fragment_spec_for(spec.family, names)
    owned = [p for _, params in fragments.fragments for p in params]
    assert sorted(owned) == sorted(names)
    assert len(owned) == len(set(owned))


def test_bert_fragments_are_blocks_bottom_up():
    fragments = fragment_spec_for("bert", parameter_names(build_student(TINY_BERT)))
    assert fragments.names == ("bert.embeddings", "bert.encoder.layer.0", "bert.encoder.layer.1", "bert.pooler",
                               "classifier")


def test_mlp_fragments_are_layers():
    assert fragment_spec_for("mlp", parameter_names(build_student(MLP))).names == ("layers.0", "layers.2", "layers.4")


def test_explicit_patterns_cover_everything_or_fail_naming_the_parameter():
    names = parameter_names(build_student(MLP))
    spec = fragment_spec_for("mlp", names, [("body", ["layers.0.*", "layers.2.*"]), ("head", ["layers.4.*"])])
    assert spec.to_dict()["head"] == ["layers.4.weight", "layers.4.bias"]
    with pytest.raises(ConfigError, match="layers.4.weight"):
        fragment_spec_for("mlp", names, [("body", ["layers.0.*", "layers.2.*"])])
    with pytest.raises(ConfigError, match="exactly one"):
        fragment_spec_for("mlp", names, [("a", ["layers.*"]), ("b", ["layers.4.*"])])


def test_plans():
    spec = fragment_spec_for("mlp", parameter_names(build_student(MLP)))
    assert planned_fragments("all", spec, 1, 6) == spec.names
    assert [planned_fragments("cyclic", spec, r, 6) for r in (1, 2, 3, 4)] == [
        ("layers.0",), ("layers.2",), ("layers.4",), ("layers.0",)]
    progressive = [planned_fragments("progressive", spec, r, 6) for r in range(1, 7)]
    assert progressive[0] == ("layers.0",) and progressive[-1] == spec.names
    assert all(len(a) <= len(b) for a, b in zip(progressive, progressive[1:]))


def test_unknown_fragment_is_refused_by_name():
    spec = fragment_spec_for("mlp", parameter_names(build_student(MLP)))
    with pytest.raises(UpdateRejected, match="decoder"):
        spec.parameters_of("decoder")
