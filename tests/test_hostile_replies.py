"""Property-based: arbitrary replies against the real Coordinator never crash a round and never skew it.

For every generated round, the coordinator either aggregates exactly the well-formed replies (the new student is
their example-weighted mean) or records each bad one as a rejection under its site's name; the run ledger still
verifies. A second round replays every first-round reply verbatim: each is rejected as replayed.
"""

from __future__ import annotations

import math
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from coordinator.rounds import Coordinator
from protocols.ledger import verify_ledger
from tests.helpers import federation, plain_reply

BOUND = 2.0
TALLY: Counter = Counter()

# Each mutation makes one reply malformed in one way; the coordinator must name it, whatever it is.
MUTATIONS = [
    "dtype-float64", "dtype-int32", "dtype-float16", "shape", "missing-tensor", "extra-tensor", "nan", "inf",
    "not-an-array", "object-array", "examples-zero", "examples-negative", "examples-bool", "examples-float",
    "examples-huge", "examples-text", "loss-nan", "loss-inf", "loss-negative", "loss-text", "privacy-missing",
    "privacy-extra", "privacy-nan-epsilon", "privacy-bad-hash", "privacy-bad-accountant", "privacy-negative-seq",
    "binding-nonce", "binding-round", "binding-run", "binding-missing", "binding-round-type", "name-empty",
    "name-not-text", "name-surrogate", "norm", "arrays-not-mapping",
]


def _mutate(reply_fields: dict, mutation: str, state: dict, planned: list[str], rng: np.random.Generator) -> dict:
    arrays = dict(reply_fields["arrays"])
    first = planned[0]
    privacy = dict(reply_fields["privacy"])
    binding = dict(reply_fields["binding"])
    if mutation.startswith("dtype-"):
        arrays[first] = arrays[first].astype(mutation.removeprefix("dtype-"))
    elif mutation == "shape":
        arrays[first] = np.zeros(arrays[first].size + 1, dtype=np.float32)
    elif mutation == "missing-tensor":
        del arrays[first]
    elif mutation == "extra-tensor":
        arrays["layers.9.weight"] = np.zeros(3, np.float32)
    elif mutation in ("nan", "inf"):
        arrays[first] = arrays[first].copy()
        arrays[first].flat[rng.integers(arrays[first].size)] = np.nan if mutation == "nan" else -np.inf
    elif mutation == "not-an-array":
        arrays[first] = arrays[first].tolist()
    elif mutation == "object-array":
        arrays[first] = np.array([object()] * arrays[first].size, dtype=object).reshape(arrays[first].shape)
    elif mutation.startswith("examples-"):
        reply_fields["num_examples"] = {"zero": 0, "negative": -5, "bool": True, "float": 10.5, "huge": 10**12,
                                        "text": "10"}[mutation.removeprefix("examples-")]
    elif mutation.startswith("loss-"):
        reply_fields["train_loss"] = {"nan": math.nan, "inf": math.inf, "negative": -0.1,
                                      "text": "0.1"}[mutation.removeprefix("loss-")]
    elif mutation == "privacy-missing":
        del privacy["epsilon-run"]
    elif mutation == "privacy-extra":
        privacy["records"] = 64
    elif mutation == "privacy-nan-epsilon":
        privacy["epsilon-run"] = math.nan
    elif mutation == "privacy-bad-hash":
        privacy["ledger-hash"] = "not-a-hash"
    elif mutation == "privacy-bad-accountant":
        privacy["accountant"] = "gdp"
    elif mutation == "privacy-negative-seq":
        privacy["ledger-seq"] = -1
    elif mutation == "binding-nonce":
        binding["nonce"] = "0" * 32
    elif mutation == "binding-round":
        binding["round"] = binding["round"] + 1
    elif mutation == "binding-run":
        binding["run-id"] = "another-run"
    elif mutation == "binding-missing":
        del binding["nonce"]
    elif mutation == "binding-round-type":
        binding["round"] = str(binding["round"])
    elif mutation == "name-empty":
        reply_fields["site"] = ""
    elif mutation == "name-not-text":
        reply_fields["site"] = 42
    elif mutation == "name-surrogate":
        reply_fields["site"] = "site-\ud800"
    elif mutation == "norm":
        arrays[first] = (state[first] + 10.0 * BOUND).astype(np.float32)
    elif mutation == "arrays-not-mapping":
        arrays = [1, 2, 3]  # type: ignore[assignment]
    return reply_fields | {"arrays": arrays, "privacy": privacy, "binding": binding}


reply_specs = st.lists(
    st.tuples(st.sampled_from(["honest"] * 12 + MUTATIONS), st.integers(1, 500), st.integers(0, 2**31),
              st.booleans()),
    min_size=1, max_size=6)


def _check_arbitrary_replies(specs) -> None:
    """Every reply is aggregated exactly or rejected by name, whatever the mix of honest and mutated ones."""
    with tempfile.TemporaryDirectory() as directory:
        coordinator = Coordinator(federation(secure_aggregation=False, max_update_norm=BOUND, rounds=2), "run",
                                  Path(directory))
        state = {k: v.copy() for k, v in coordinator.state.items()}
        planned = list(coordinator.spec.parameters_of_all(coordinator.instruction(1).fragments))
        replies, honest = [], {}
        for index, (kind, examples, seed, duplicate) in enumerate(specs):
            rng = np.random.default_rng(seed)
            site = f"site-{index}"
            arrays = {name: (state[name] + rng.normal(scale=0.01, size=state[name].shape)).astype(np.float32)
                      for name in planned}
            fields = {"site": site, "arrays": arrays, "num_examples": examples, "ledger_seq": index + 1}
            reply = plain_reply(coordinator, 1, **fields)
            if kind != "honest":
                reply = type(reply)(**_mutate(dict(reply.__dict__), kind, state, planned, rng))
            replies.append(reply)
            if duplicate and kind == "honest":
                replies.append(reply)  # the same site twice: both copies are rejected
            elif kind == "honest":
                honest[site] = reply
            TALLY["replies"] += 1 + (duplicate and kind == "honest")
        try:
            record = coordinator.complete_round(1, replies, {}, started=0.0)
        except Exception as err:  # the property under test: this never happens
            TALLY["crashes"] += 1
            raise AssertionError(f"the coordinator raised {type(err).__name__}: {err}") from err
        TALLY["cases"] += 1
        TALLY["rejected by name"] += len(record["rejected"])
        assert record["participants"] == sorted(honest)
        bad = {r.site if isinstance(r.site, str) and r.site and r.site.isprintable() else None
               for r in replies if r.site not in honest}
        named = {name for name in bad if name is not None}
        assert named <= set(record["rejected"]), (named, record["rejected"])
        assert len(record["rejected"]) >= len(named) + (None in bad)
        if honest:
            weights = np.array([r.num_examples for r in honest.values()], dtype=np.float64)
            weights /= weights.sum()
            for name in planned:
                expected = sum(w * r.arrays[name].astype(np.float64) for w, r in zip(weights, honest.values()))
                assert np.allclose(coordinator.state[name], expected, atol=1e-6)
            assert record["status"] == "aggregated"
        else:
            assert all(np.array_equal(coordinator.state[k], state[k]) for k in state)
            assert record["status"] == "failed"

        # Round 2: every round-1 reply again, verbatim: replayed, so rejected by name; the student does not move.
        before = {k: v.copy() for k, v in coordinator.state.items()}
        replay = coordinator.complete_round(2, list(honest.values()), {}, started=0.0)
        assert replay["participants"] == [] and set(honest) <= set(replay["rejected"])
        assert all("replayed or stale" in replay["rejected"][site] for site in honest)
        assert all(np.array_equal(coordinator.state[k], before[k]) for k in before)
        TALLY["replays rejected"] += len(honest)
        coordinator.finish()
        verify_ledger(Path(directory) / "ledger.jsonl", (Path(directory) / "ledger_key.pub.pem").read_text())


# The default suite draws 50 mixes; the slow suite 200 (CI runs both).
@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(reply_specs)
def test_arbitrary_replies_are_aggregated_exactly_or_rejected_by_name(specs):
    _check_arbitrary_replies(specs)


@pytest.mark.slow
@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(reply_specs)
def test_many_more_arbitrary_replies_are_aggregated_exactly_or_rejected_by_name(specs):
    _check_arbitrary_replies(specs)


def test_tally_of_the_property_run():
    """Runs after the property test (file order): the counts the closing note quotes, and no crash."""
    print(f"\nhostile replies: {dict(TALLY)}")
    assert TALLY["crashes"] == 0
    assert TALLY["cases"] > 0 or not TALLY, "the property test generated no case"
