"""The gate decision on hand-made numbers (pure function, no I/O)."""

from __future__ import annotations

import math

import pytest

from tasks.gates import GateInputs, GateThresholds, decide_gates, gate_inputs

T = GateThresholds(metric="ndcg@10", pop_margin=1.0, ease_fraction=0.97, champion_epsilon=0.5,
                   fidelity_fraction=0.95, min_eval_users=50)


def inputs(**kw) -> GateInputs:
    base = dict(candidate_val=23.5, candidate_test=32.9, pop_val=10.0, ease_val=24.0,
                reference_test=33.4, reference="∞-AE on all 6040 users", eval_users=6040)
    base.update(kw)
    return GateInputs(**base)


def by_name(verdict):
    return {g.name: g for g in verdict.gates}


def test_first_model_passes_without_champion():
    v = decide_gates(inputs(), T)
    assert v.passed
    assert by_name(v)["champion"].reason == "no champion yet"
    heads = [r.split(":")[0] for r in v.reasons]
    assert heads == ["PASS evidence", "PASS baselines", "PASS champion", "PASS fidelity"]


def test_ml1m_like_numbers_pass_the_default_ease_fraction():
    # algorithms.md: validation nDCG@10, ∞-AE 23.67 vs tuned EASE 24.00 → 0.986 ≥ 0.97
    assert decide_gates(inputs(candidate_val=23.67, ease_val=24.00), T).passed


@pytest.mark.parametrize(
    "change, failing",
    [
        ({"pop_val": 23.0}, "baselines"),  # beats PopRec by 0.5 < margin 1.0
        ({"candidate_val": 22.0}, "baselines"),  # 22 / 24 = 0.917 < 0.97 × EASE
        ({"champion_test": 33.5, "champion_version": "3"}, "champion"),  # 0.6 worse > ε
        ({"reference_test": 35.0}, "fidelity"),  # 32.9 / 35 = 0.94 < 0.95
        ({"eval_users": 49}, "evidence"),  # fewer test users than min_eval_users
        ({"eval_users": None}, "evidence"),  # unknown: no evidence either
        ({"summary_coverage": 0.3}, "fidelity"),  # the summary misses 70% of the interactions
    ],
)
def test_each_gate_fails_alone(change, failing):
    v = decide_gates(inputs(**change), T)
    assert not v.passed
    assert [g.name for g in v.gates if not g.passed] == [failing]
    assert v.failures[0].startswith(failing + ":")
    assert any(r.startswith(f"FAIL {failing}:") for r in v.reasons)


def test_boundaries_are_inclusive():
    v = decide_gates(inputs(pop_val=22.5, candidate_val=23.5, ease_val=23.5 / 0.97,
                            champion_test=33.4, champion_version="1",
                            reference_test=32.9 / 0.95), T)
    assert v.passed, v.reasons


def test_champion_within_epsilon_passes_and_reason_names_it():
    v = decide_gates(inputs(champion_test=33.3, champion_version="7",
                            champion_note="same data version"), T)
    g = by_name(v)["champion"]
    assert g.passed
    assert "champion v7" in g.reason and "-0.40" in g.reason and "same data version" in g.reason


def test_all_failures_are_reported_together():
    v = decide_gates(inputs(pop_val=30.0, champion_test=40.0, champion_version="1",
                            reference_test=50.0), T)
    assert not v.passed
    assert [g.passed for g in v.gates] == [True, False, False, False]
    assert len(v.failures) == 3


def test_reference_description_is_in_the_fidelity_reason():
    ref = "∞-AE on a random sample of 20000 of 480189 users (largest allowed)"
    g = by_name(decide_gates(inputs(reference=ref), T))["fidelity"]
    assert ref in g.reason and "0.985×" in g.reason


@pytest.mark.parametrize(
    "field", ["candidate_val", "candidate_test", "pop_val", "ease_val", "reference_test"]
)
@pytest.mark.parametrize("bad", [None, math.nan, math.inf])
def test_missing_or_non_finite_numbers_fail(field, bad):
    v = decide_gates(inputs(**{field: bad}), T)
    assert not v.passed
    assert any("missing or non-finite" in f and field in f for f in v.failures)


def test_thresholds_from_params_use_the_selection_metric():
    from tasks.params import parse_params

    p = parse_params({"gates": {"ease_fraction": 0.9}, "selection": {"metric": "hr@100"}})
    t = GateThresholds.from_params(p)
    assert t.ease_fraction == 0.9 and t.metric == "hr@100" and t.fidelity_fraction == 0.95
    assert t.min_eval_users == 50 == GateThresholds().min_eval_users  # the schema's default
    # stricter threshold → same numbers fail
    assert not decide_gates(inputs(), GateThresholds(ease_fraction=0.99)).passed


def _evaluation(metric_values: dict) -> dict:
    def block(val, test):
        return {"val": {"ndcg@10": val, "hr@100": val + 30}, "test": {"ndcg@10": test,
                                                                        "hr@100": test + 30}}
    return {"candidate": block(*metric_values["candidate"]), "poprec": block(*metric_values["pop"]),
            "ease": block(*metric_values["ease"]),
            "reference": {**block(*metric_values["ref"]), "description": "∞-AE on all 9 users"}}


def test_gate_inputs_from_an_evaluation_report_pick_the_selection_metric():
    ev = _evaluation({"candidate": (23.5, 32.9), "pop": (10.0, 12.0), "ease": (24.0, 33.0),
                      "ref": (23.9, 33.4)})
    for metric, offset in (("ndcg@10", 0), ("hr@100", 30)):
        inp = gate_inputs(ev, metric, {"version": "4", "test": {metric: 30.0 + offset},
                                       "note": "same data version"})
        assert inp.candidate_val == 23.5 + offset and inp.reference_test == 33.4 + offset
        assert inp.champion_test == 30.0 + offset and inp.champion_version == "4"
        assert inp.reference == "∞-AE on all 9 users"
    assert gate_inputs(ev, "ndcg@10", None).champion_version is None


def test_unusable_champion_is_skipped_with_its_reason_not_failed():
    ev = _evaluation({"candidate": (23.5, 32.9), "pop": (10.0, 12.0), "ease": (24.0, 33.0),
                      "ref": (23.9, 33.4)})
    champion = {"version": "3", "test": None, "unusable": "model.npz: truncated"}
    v = decide_gates(gate_inputs(ev, "ndcg@10", champion, eval_users=6040), T)
    g = by_name(v)["champion"]
    assert v.passed and g.passed and "skipped" in g.reason and "truncated" in g.reason


def test_each_gate_reports_its_figure_and_threshold():
    v = decide_gates(inputs(champion_test=33.0, champion_version="2"), T)
    g = by_name(v)
    assert g["baselines"].value == 23.5 and g["baselines"].threshold == pytest.approx(0.97 * 24)
    assert g["champion"].value == 32.9 and g["champion"].threshold == pytest.approx(32.5)
    assert g["fidelity"].value == pytest.approx(32.9 / 33.4) and g["fidelity"].threshold == 0.95


def test_verdict_to_dict_is_json_ready():
    import json

    d = decide_gates(inputs(champion_test=40.0, champion_version="2"), T).to_dict()
    assert json.loads(json.dumps(d))["passed"] is False
    assert [g["name"] for g in d["gates"]] == ["evidence", "baselines", "champion", "fidelity"]


def test_a_handful_of_users_is_not_eligible_even_with_perfect_numbers():
    """Two test users with zero references everywhere (what a 2-user log gives): every ratio
    gate and the evidence gate fail; nothing passes on nothing."""
    lenient = GateThresholds(pop_margin=0.0, ease_fraction=0.0, champion_epsilon=100.0,
                             fidelity_fraction=0.0, min_eval_users=50)
    v = decide_gates(inputs(candidate_val=0.0, candidate_test=0.0, pop_val=0.0, ease_val=0.0,
                            reference_test=0.0, eval_users=2), lenient)
    g = by_name(v)
    assert not v.passed and not g["evidence"].passed
    assert "2 test users" in g["evidence"].reason and "need ≥ 50" in g["evidence"].reason
    assert g["evidence"].value == 2 and g["evidence"].threshold == 50
    assert not g["baselines"].passed and "EASE scores 0" in g["baselines"].reason
    assert not g["fidelity"].passed and "zero reference" in g["fidelity"].reason
    assert "inf" not in " ".join(v.reasons)
    # enough users, a positive reference: the same lenient thresholds pass
    assert decide_gates(inputs(eval_users=50), lenient).passed


def test_evaluated_users_counts_users_with_a_test_item_and_the_report_wins():
    import numpy as np
    import scipy.sparse as sp

    from tasks.gates import evaluated_users

    class Data:  # what evaluated_users reads of a tasks.data.Dataset
        test = sp.csr_matrix(np.array([[1, 0], [0, 0], [0, 1], [1, 1]], dtype=np.float32))

    assert evaluated_users(Data()) == 3
    ev = _evaluation({"candidate": (23.5, 32.9), "pop": (10.0, 12.0), "ease": (24.0, 33.0),
                      "ref": (23.9, 33.4)})
    assert gate_inputs(ev, "ndcg@10", None, 3).eval_users == 3
    assert gate_inputs({**ev, "n_users": 70}, "ndcg@10", None, 3).eval_users == 70
    assert gate_inputs(ev, "ndcg@10", None, "12").eval_users == 12  # a registry tag's string
    sampled = {**ev, "sample": {"test_users": 40, "test_population": 900}}
    assert gate_inputs(sampled, "ndcg@10", None, 900).eval_users == 40  # the users scored


def test_a_champion_of_another_catalogue_is_skipped_with_the_reason():
    ev = _evaluation({"candidate": (23.5, 32.9), "pop": (10.0, 12.0), "ease": (24.0, 33.0),
                      "ref": (23.9, 33.4)})
    champion = {"version": "1", "test": None,
                "other_catalogue": "it knows 0% of this data's 200 items, need ≥ 50%"}
    v = decide_gates(gate_inputs(ev, "ndcg@10", champion, eval_users=400), T)
    g = by_name(v)["champion"]
    assert v.passed and g.passed  # a new catalogue's candidate that passes the rest is champion
    assert g.reason.startswith("skipped: champion v1 is of another catalogue") and "0%" in g.reason


def test_catalogue_fingerprint_and_overlap():
    from tasks.gates import catalogue_fingerprint, catalogue_overlap

    assert catalogue_fingerprint([3, 10, 17]) == catalogue_fingerprint([17, 3, 10, 3])
    assert catalogue_fingerprint([3, 10, 17]) != catalogue_fingerprint([3, 10, 24])
    assert catalogue_overlap([3, 10, 17], [3, 10, 24, 31]) == 0.5
    assert catalogue_overlap([3, 10], [1_000_003]) == 0.0 and catalogue_overlap([1], []) == 0.0


def test_a_summary_blind_to_most_of_the_catalogue_is_rejected_for_that():
    """The fidelity ratio may look fine on a user sample; too little coverage still fails, with
    the coverage in the reason (read from evaluation.json's coverage and sample)."""
    evaluation = {"candidate": {"val": {"ndcg@10": 23.5}, "test": {"ndcg@10": 32.9}},
                  "poprec": {"val": {"ndcg@10": 10.0}}, "ease": {"val": {"ndcg@10": 24.0}},
                  "reference": {"test": {"ndcg@10": 33.4}, "description": "∞-AE on all users"},
                  "coverage": {"items": 0.1, "interactions": 0.42},
                  "sample": {"test_users": 20000, "test_population": 150000}}
    inp = gate_inputs(evaluation, "ndcg@10")
    assert inp.summary_coverage == 0.42 and inp.eval_users == 20000
    g = by_name(decide_gates(inp, T))["fidelity"]
    assert not g.passed and "only 42.0% of the train interactions (need ≥ 50%)" in g.reason
    ok = gate_inputs({**evaluation, "coverage": {"items": 0.6, "interactions": 0.9}}, "ndcg@10")
    assert decide_gates(ok, T).passed
