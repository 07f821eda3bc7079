"""Promotion gates: a pure decision from numbers to a verdict with reasons (no I/O).

Four gates, on one metric (``selection.metric``, default nDCG@10; values ×100) — the metric
that also chose every λ and the summary's best step:

(0) **evidence** — the candidate was evaluated on at least ``min_eval_users`` test users (users
    with a test interaction): a handful of users proves nothing, so such a candidate is never
    eligible, whatever its numbers;

(a) **baselines** — on validation, the candidate beats PopRec by at least ``pop_margin`` points
    and reaches ``ease_fraction`` × a tuned EASE fitted on the same data;
(b) **champion** — on test, the candidate is not worse than the current champion by more than
    ``champion_epsilon`` points (passes when there is no champion yet, and is skipped, with the
    reason, when the champion belongs to another catalogue: it knows less than
    ``min_catalogue_overlap`` of the data's items);
(c) **fidelity** — on test, the candidate (fitted on a summary) reaches ``fidelity_fraction`` ×
    ∞-AE fitted on all users of the same data (or on the largest user sample that fits: the
    reference's description is part of the reason), and its summary touches items carrying at
    least ``min_summary_coverage`` of the train interactions (a summary blind to most of the
    catalogue is rejected for that, whatever the ratio on a user sample says).

Every gate is evaluated (no short-circuit) so a verdict lists every reason. A missing or
non-finite number fails its gate, and so does a ratio gate whose reference is zero (a candidate
compared with nothing has not shown anything).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Optional

import numpy as np

from tasks.params import GatesParams

_DEFAULT_GATES = GatesParams()  # the defaults live once, in the params schema


@dataclass(frozen=True)
class GateThresholds:
    metric: str = "ndcg@10"
    pop_margin: float = _DEFAULT_GATES.pop_margin
    ease_fraction: float = _DEFAULT_GATES.ease_fraction
    champion_epsilon: float = _DEFAULT_GATES.champion_epsilon
    fidelity_fraction: float = _DEFAULT_GATES.fidelity_fraction
    min_eval_users: int = _DEFAULT_GATES.min_eval_users
    min_summary_coverage: float = _DEFAULT_GATES.min_summary_coverage

    @classmethod
    def from_params(cls, params: Any) -> "GateThresholds":
        """From a :class:`tasks.params.Params` (``gates.*`` and ``selection.metric``)."""
        g = params.gates
        return cls(metric=params.selection.metric, pop_margin=g.pop_margin,
                   ease_fraction=g.ease_fraction, champion_epsilon=g.champion_epsilon,
                   fidelity_fraction=g.fidelity_fraction, min_eval_users=g.min_eval_users,
                   min_summary_coverage=g.min_summary_coverage)


@dataclass(frozen=True)
class GateInputs:
    """The numbers the gates read (one metric, ×100)."""

    candidate_val: float
    candidate_test: float
    pop_val: float
    ease_val: float
    reference_test: float
    reference: str = "∞-AE on all users"  # what the fidelity reference was fitted on
    champion_test: Optional[float] = None  # None: no champion yet
    champion_version: Optional[str] = None
    champion_note: str = ""  # e.g. "re-evaluated on this data's test split"
    # why the champion could not be compared (its artifacts do not load, say): gate (b) is then
    # skipped with this reason instead of failing every later run
    champion_unusable: Optional[str] = None
    # why the champion is of another catalogue (it knows too few of this data's items): gate (b)
    # is then skipped with this reason — the old catalogue's numbers say nothing about this one
    champion_other_catalogue: Optional[str] = None
    # test users the candidate was evaluated on (users with a test interaction); None: unknown
    eval_users: Optional[int] = None
    # share of train interactions on the items the candidate's summary touches; None: unknown
    # (a report from before it was recorded: not judged)
    summary_coverage: Optional[float] = None


@dataclass(frozen=True)
class GateResult:
    name: str
    passed: bool
    reason: str
    value: Optional[float] = None  # the figure compared (candidate's, or its ratio)
    threshold: Optional[float] = None  # what it had to reach


@dataclass(frozen=True)
class Verdict:
    passed: bool
    gates: tuple[GateResult, ...] = field(default_factory=tuple)

    @property
    def reasons(self) -> list[str]:
        """One line per gate, e.g. ``"PASS baselines: …"`` / ``"FAIL fidelity: …"``."""
        return [f"{'PASS' if g.passed else 'FAIL'} {g.name}: {g.reason}" for g in self.gates]

    @property
    def failures(self) -> list[str]:
        return [f"{g.name}: {g.reason}" for g in self.gates if not g.passed]

    def to_dict(self) -> dict[str, Any]:
        return {"passed": self.passed, "gates": [asdict(g) for g in self.gates],
                "reasons": self.reasons}


def catalogue_fingerprint(item_ids: Any) -> str:
    """The catalogue's identity: a short hash of the sorted, distinct raw item ids."""
    import hashlib

    ids = np.unique(np.asarray(item_ids, dtype=np.int64))
    return hashlib.sha256(ids.astype("<i8").tobytes()).hexdigest()[:12]


def catalogue_overlap(model_item_ids: Any, data_item_ids: Any) -> float:
    """Share of the data's items that a model knows (1.0: every one; 0.0: none)."""
    data = np.unique(np.asarray(data_item_ids, dtype=np.int64))
    if data.size == 0:
        return 0.0
    return float(np.isin(data, np.asarray(model_item_ids, dtype=np.int64)).mean())


def evaluated_users(dataset: Any) -> int:
    """Test users of a :class:`tasks.data.Dataset`: users with at least one test interaction —
    the users every test metric is averaged over."""
    return int(np.count_nonzero(np.diff(dataset.test.indptr)))


def gate_inputs(evaluation: dict[str, Any], metric: str,
                champion: Optional[dict[str, Any]] = None,
                eval_users: Optional[int] = None) -> GateInputs:
    """The gates' numbers from an evaluate-stage report (``evaluation.json``) and the champion
    (``{"version", "test": {metric: value} or None, "note"}``; None: no champion). The one place
    gate inputs are built — for a pipeline run and for ``infrec promote VERSION`` alike.
    ``eval_users``: the test users (:func:`evaluated_users`), when the report does not say
    (its ``n_users`` or ``sample.test_users`` win: with a user sample, fewer were scored)."""
    def pick(block: Optional[dict[str, Any]], split: str) -> Optional[float]:
        value = ((block or {}).get(split) or {}).get(metric)
        return None if value is None else float(value)

    ref = evaluation.get("reference") or {}
    champ_test = None
    if champion is not None and champion.get("test") is not None:
        champ_test = float(champion["test"][metric]) if metric in champion["test"] else math.nan
    return GateInputs(
        candidate_val=pick(evaluation.get("candidate"), "val"),
        candidate_test=pick(evaluation.get("candidate"), "test"),
        pop_val=pick(evaluation.get("poprec"), "val"), ease_val=pick(evaluation.get("ease"), "val"),
        reference_test=pick(ref, "test"), reference=ref.get("description", "∞-AE on all users"),
        champion_test=champ_test if champion is not None else None,
        champion_version=None if champion is None else str(champion["version"]),
        champion_note="" if champion is None else champion.get("note", ""),
        champion_unusable=None if champion is None else champion.get("unusable"),
        champion_other_catalogue=None if champion is None else champion.get("other_catalogue"),
        eval_users=_users(_reported_users(evaluation, eval_users)),
        summary_coverage=(evaluation.get("coverage") or {}).get("interactions"),
    )


def _reported_users(evaluation: dict[str, Any], fallback: Any) -> Any:
    """The test users the report says were scored (``n_users``, or its sample's ``test_users``:
    users with a test interaction, in the evaluation sample), else ``fallback``."""
    if evaluation.get("n_users") is not None:
        return evaluation["n_users"]
    sample = evaluation.get("sample") or (evaluation.get("candidate") or {}).get("sample") or {}
    return sample.get("test_users", fallback)


def _users(value: Any) -> Optional[int]:
    try:
        return None if value is None else int(value)
    except (TypeError, ValueError):
        return None


def _ok(x: Optional[float]) -> bool:
    return x is not None and isinstance(x, (int, float)) and math.isfinite(x)


def _bad_numbers(**named: Optional[float]) -> Optional[str]:
    bad = [k for k, v in named.items() if not _ok(v)]
    return f"missing or non-finite {', '.join(bad)}" if bad else None


def evidence_gate(inp: GateInputs, t: GateThresholds) -> GateResult:
    need = t.min_eval_users
    if inp.eval_users is None:
        return GateResult("evidence", False, f"number of test users unknown (need ≥ {need}); "
                          "not eligible", threshold=float(need))
    passed = inp.eval_users >= need
    reason = (f"evaluated on {inp.eval_users} test users (need ≥ {need})"
              + ("" if passed else "; too few to judge: not eligible"))
    return GateResult("evidence", passed, reason, value=float(inp.eval_users),
                      threshold=float(need))


def baselines_gate(inp: GateInputs, t: GateThresholds) -> GateResult:
    m = t.metric
    problem = _bad_numbers(candidate_val=inp.candidate_val, pop_val=inp.pop_val,
                           ease_val=inp.ease_val)
    if problem:
        return GateResult("baselines", False, problem)
    lead = inp.candidate_val - inp.pop_val
    need = t.ease_fraction * inp.ease_val
    beats_pop = lead >= t.pop_margin
    # a zero reference is no evidence: the ratio is undefined, the gate fails
    near_ease = inp.ease_val > 0 and inp.candidate_val >= need
    ratio = (f"{inp.candidate_val / inp.ease_val:.3f}×" if inp.ease_val > 0
             else "no ratio: EASE scores 0")
    reason = (
        f"val {m} {inp.candidate_val:.2f} vs PopRec {inp.pop_val:.2f} "
        f"({lead:+.2f}, need ≥ +{t.pop_margin:g}){'' if beats_pop else ' ✗'}; "
        f"vs EASE {inp.ease_val:.2f} ({ratio}, need ≥ {t.ease_fraction:g}×)"
        f"{'' if near_ease else ' ✗'}"
    )
    return GateResult("baselines", beats_pop and near_ease, reason, value=inp.candidate_val,
                      threshold=max(inp.pop_val + t.pop_margin, need))


def champion_gate(inp: GateInputs, t: GateThresholds) -> GateResult:
    m = t.metric
    if inp.champion_unusable:
        return GateResult("champion", True, f"skipped: champion v{inp.champion_version} is "
                          f"unusable ({inp.champion_unusable})")
    if inp.champion_other_catalogue:
        return GateResult("champion", True, f"skipped: champion v{inp.champion_version} is of "
                          f"another catalogue ({inp.champion_other_catalogue}); not compared")
    if inp.champion_version is None:
        return GateResult("champion", True, "no champion yet")
    problem = _bad_numbers(candidate_test=inp.candidate_test, champion_test=inp.champion_test)
    if problem:
        return GateResult("champion", False, problem)
    delta = inp.candidate_test - inp.champion_test
    passed = delta >= -t.champion_epsilon
    who = f"champion v{inp.champion_version}" if inp.champion_version else "champion"
    note = f" [{inp.champion_note}]" if inp.champion_note else ""
    reason = (
        f"test {m} {inp.candidate_test:.2f} vs {who} {inp.champion_test:.2f} "
        f"({delta:+.2f}, allowed ≥ −{t.champion_epsilon:g}){note}"
    )
    return GateResult("champion", passed, reason, value=inp.candidate_test,
                      threshold=inp.champion_test - t.champion_epsilon)


def fidelity_gate(inp: GateInputs, t: GateThresholds) -> GateResult:
    m = t.metric
    problem = _bad_numbers(candidate_test=inp.candidate_test, reference_test=inp.reference_test)
    if problem:
        return GateResult("fidelity", False, problem)
    if inp.reference_test <= 0:  # a zero reference is no evidence: no ratio, the gate fails
        return GateResult("fidelity", False,
                          f"test {m} {inp.candidate_test:.2f} vs {inp.reference} "
                          f"{inp.reference_test:.2f}: a zero reference gives no ratio "
                          f"(need ≥ {t.fidelity_fraction:g}×)",
                          threshold=t.fidelity_fraction)
    need = t.fidelity_fraction * inp.reference_test
    ratio = inp.candidate_test / inp.reference_test
    passed = inp.candidate_test >= need
    reason = (
        f"test {m} {inp.candidate_test:.2f} = {ratio:.3f}× {inp.reference} "
        f"({inp.reference_test:.2f}; need ≥ {t.fidelity_fraction:g}×)"
    )
    cov = inp.summary_coverage
    if cov is not None and cov < t.min_summary_coverage:
        passed = False
        reason += (f"; the summary touches items with only {100 * cov:.1f}% of the train "
                   f"interactions (need ≥ {100 * t.min_summary_coverage:g}%): too little of the "
                   "catalogue")
    return GateResult("fidelity", passed, reason, value=ratio, threshold=t.fidelity_fraction)


def decide_gates(inputs: GateInputs, thresholds: GateThresholds = GateThresholds()) -> Verdict:
    """Evaluate gates (0), (a), (b), (c); the verdict passes only if all four pass."""
    results = (
        evidence_gate(inputs, thresholds),
        baselines_gate(inputs, thresholds),
        champion_gate(inputs, thresholds),
        fidelity_gate(inputs, thresholds),
    )
    return Verdict(passed=all(r.passed for r in results), gates=results)


__all__ = ["GateThresholds", "GateInputs", "GateResult", "Verdict", "decide_gates", "gate_inputs",
           "evaluated_users", "catalogue_fingerprint", "catalogue_overlap"]
