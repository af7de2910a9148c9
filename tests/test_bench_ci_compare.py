"""pcbedge bench --compare: the statistics on hand-checkable cases, and three real runs of a tiny
bundle: a baseline, a second run of the same bundle (no significant change) and a deliberately
slowed one (significant, and a regression gate fails with exit code 3).

The slowdown comes from a test-only runner wrapper that sleeps before each timed ``ask``. Both the
baseline and the "same" run sleep DELAY_S too, so a question takes ~DELAY_S + the model's ~20 ms:
on a shared 2-core VM the model part alone moved by up to 40% between runs with no visible load,
and a sleep-dominated latency keeps that drift under compare's 10% floor. The slowed run sleeps
SLOW_S (about twice as long), which no machine noise can hide.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from pcbedge.benchmarks import compare as cmp
from pcbedge.errors import GateFailed, PcbEdgeError

DELAY_S, SLOW_S = 0.08, 0.20
RUN = {"queries": 90, "min_seconds": 0.0, "warmup": 2, "max_boards": 3, "progress": False,
       "gates": {"min_map": 0.0, "p95_ms_max": 1e9}}
LATENCY_ROWS = ("latency_p50", "latency_p90", "latency_p95")


# ----------------------------------------------------------------------------- statistics

def test_exact_tests_match_known_values():
    # scipy.stats.fisher_exact([[8, 2], [1, 5]]) -> p = 0.034965...
    assert cmp.fisher_exact(8, 2, 1, 5) == pytest.approx(0.03496503496503495)
    assert cmp.fisher_exact(5, 5, 5, 5) == pytest.approx(1.0)
    assert cmp.binomial_two_sided(0, 5) == pytest.approx(2 / 32)
    assert cmp.binomial_two_sided(3, 6) == 1.0 and cmp.binomial_two_sided(0, 0) == 1.0


def test_latency_row_same_and_shifted_distributions():
    import numpy as np
    rng = np.random.default_rng(0)
    base = rng.gamma(9, 10, 400)
    same = rng.gamma(9, 10, 400)
    slow = same * 1.5
    r_same = cmp.latency_row(base, same, 0.95)
    assert r_same["statistically_significant"] is False and r_same["change"] == \
        "no significant change"
    lo, hi = r_same["ci"]
    assert lo < 0 < hi
    r_slow = cmp.latency_row(base, slow, 0.5)
    assert r_slow["significant"] and r_slow["change"] == "slower" and r_slow["ci"][0] > 0
    assert r_slow["p_value"] < 1e-6
    # a statistically clear but small (3%) shift is below the practical floor
    r_small = cmp.latency_row(base, base * 1.03, 0.5)
    assert r_small["significant"] is False


def test_paired_accuracy_mcnemar_and_gate():
    base = {f"q{i}": True for i in range(100)}
    cur = {**base, **{f"q{i}": False for i in range(12)}}     # 12 answers lost, none gained
    row = cmp.paired_row(base, cur)
    assert row["lost"] == 12 and row["gained"] == 0 and row["delta"] == pytest.approx(-0.12)
    assert row["p_value"] == pytest.approx(2 / 2 ** 12) and row["change"] == "worse"
    gates = cmp.evaluate_regression_gates(
        {"max_question_accuracy_drop": 0.05, "max_count_match_drop": 0.2},
        {"rows": {"question_accuracy": row, "count_exact_match": row}})
    assert gates["max_question_accuracy_drop"]["passed"] is False
    assert gates["max_question_accuracy_drop"]["value"] == pytest.approx(0.12)
    assert gates["max_count_match_drop"]["passed"] is True  # within its allowance
    noisy = cmp.paired_row(base, {**base, "q1": False, "q2": False})
    assert noisy["p_value"] == pytest.approx(0.5) and noisy["change"] == "no significant change"


def test_bad_regression_gates_and_baselines_fail_before_running(tmp_path):
    with pytest.raises(PcbEdgeError, match="unknown regression gate 'p95_pct'"):
        cmp.check_regression_limits({"p95_pct": 5})
    with pytest.raises(PcbEdgeError, match="not a finite number"):
        cmp.check_regression_limits({"max_p95_regression_pct": -1})
    with pytest.raises(PcbEdgeError, match="not found"):
        cmp.load_baseline(tmp_path / "nothing" / "report.json")
    (tmp_path / "report.json").write_text(json.dumps({"latency_ms": {}}))
    with pytest.raises(PcbEdgeError, match="no raw latency samples"):
        cmp.load_baseline(tmp_path)  # a folder holding report.json is accepted


def test_cli_passes_compare_and_regression_gates(monkeypatch):
    from pcbedge import api
    from pcbedge.cli import REGRESSION_OPTIONS, cli

    assert REGRESSION_OPTIONS == tuple(cmp.REGRESSION_GATES)
    seen = {}
    monkeypatch.setattr(api, "run_benchmark",
                        lambda bundle, **kw: seen.update(kw) or {"passed": True, "gates": {}})
    result = CliRunner().invoke(cli, ["bench", "b", "--compare", "old/report.json",
                                      "--max-p95-regression-pct", "10", "--busy-machine",
                                      "refuse"])
    assert result.exit_code == 0, result.output
    assert seen["compare"] == Path("old/report.json") and seen["busy_machine"] == "refuse"
    assert seen["regression_gates"] == {"max_p95_regression_pct": 10.0}
    assert seen["gates"] == {}


# ----------------------------------------------------------------------------- real runs

class Delayed:
    """A runner whose ``ask`` (the timed call) first sleeps ``delay`` seconds."""

    def __init__(self, runner, delay: float):
        self._runner, self._delay = runner, delay

    def ask(self, *args, **kwargs):
        time.sleep(self._delay)
        return self._runner.ask(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._runner, name)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """(baseline, same, slowed) reports; the slowed one raised GateFailed (p95 gate)."""
    pytest.importorskip("torch")
    from pcbedge.benchmarks import workload as wl
    from pcbedge.benchmarks.harness import run_benchmark
    from pcbedge.testing import tiny_bundle

    root = tmp_path_factory.mktemp("compare")
    bundle = tiny_bundle(tmp_path_factory.getbasetemp() / "shared-tiny-export")[1]
    real = wl.open_runner
    mp = pytest.MonkeyPatch()
    try:
        mp.setattr(wl, "open_runner", lambda p, **kw: Delayed(real(p, **kw), DELAY_S))
        base = run_benchmark(bundle, out_dir=root / "base", reference=bundle, **RUN)
        same = run_benchmark(bundle, out_dir=root / "same", reference=bundle,
                             compare=root / "base" / "report.json",
                             # generous: a neighbour on a shared CI box moves P95 by tens of
                             # percent between processes; significance is checked below
                             regression_gates={"max_p95_regression_pct": 100.0,
                                               "max_question_accuracy_drop": 0.0,
                                               "max_agreement_drop": 0.0}, **RUN)
        mp.setattr(wl, "open_runner", lambda p, **kw: Delayed(real(p, **kw), SLOW_S))
        with pytest.raises(GateFailed, match="max_p95_regression_pct") as err:
            run_benchmark(bundle, out_dir=root / "slow", reference=bundle,
                          compare=root / "base" / "report.json",
                          regression_gates={"max_p95_regression_pct": 25.0}, **RUN)
        assert err.value.exit_code == 3
    finally:
        mp.undo()
    slow = json.loads((root / "slow" / "report.json").read_text())
    return base, same, slow


def test_same_bundle_shows_no_significant_change(runs):
    base, same, _ = runs
    rows = same["compare"]["rows"]
    busy = base["machine_state"]["busy"] or same["machine_state"]["busy"]
    for name in LATENCY_ROWS:
        # a neighbour's load is the one thing that may move a same-bundle run: it is flagged
        assert rows[name]["significant"] is False or busy, (name, rows[name])
    for name in ("question_accuracy", "count_exact_match", "answer_agreement", "board_errors"):
        assert rows[name]["delta"] == 0 and rows[name]["p_value"] == 1.0, name
    assert same["gates"]["max_question_accuracy_drop"]["passed"] is True
    assert same["gates"]["max_agreement_drop"]["passed"] is True
    assert busy or same["gates"]["max_p95_regression_pct"]["passed"] is True
    assert same["compare"]["baseline"].endswith("report.json")


def test_slowed_run_is_significantly_slower(runs):
    _, _, slow = runs
    rows = slow["compare"]["rows"]
    for name in LATENCY_ROWS:
        r = rows[name]
        assert r["significant"] and r["change"] == "slower", (name, r)
        # complete separation leaves p95 with 9 of 180 samples above the pooled quantile: p ~ 0.003
        assert r["ci"][0] > 0 and r["p_value"] < 0.05 and r["delta_pct"] > 50
    g = slow["gates"]["max_p95_regression_pct"]
    assert g["passed"] is False and g["value"] > 25 and slow["failed_gates"] == \
        ["max_p95_regression_pct"]
    assert rows["question_accuracy"]["change"] == "no significant change"
    junit = (Path(slow["outputs"]["junit.xml"])).read_text()
    assert 'name="pcbedge.bench.compare"' in junit and "slower" in junit
    md = Path(slow["outputs"]["summary.md"]).read_text()
    assert "### Against the baseline" in md and "**slower**" in md
    assert 'id="against-the-baseline"' in Path(slow["outputs"]["report.html"]).read_text()
