"""pcbedge bench: the report's schema and files, gates and their exit code, drift against a
reference, list-file subsets, the sweep and robustness tables, and the accuracy definitions.

Runs use a tiny random-weight bundle (pcbedge.testing + the real exporter, once per module) on a
few boards of the embedded sample with a short latency pass; the figures of a random model are
meaningless, the structure and the invariants (self-drift 0, gates) are what is checked.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pcbedge.runtime.protocol import Encoded, Prepared, Runner
from pcbedge.benchmarks import accuracy as acc
from pcbedge.benchmarks import gates as gates_mod
from pcbedge.benchmarks.harness import run_benchmark
from pcbedge.benchmarks.workload import QUESTION_SPLIT, Query, Workload, load_workload
from pcbedge.data.deeppcb import Board, Defect
from pcbedge.data.qa import ALL_KINDS, QA
from pcbedge.errors import BundleError, GateFailed, PcbEdgeError

FAST = {"queries": 6, "min_seconds": 0.0, "warmup": 1, "max_boards": 3, "progress": False}
OPEN_GATES = {"min_map": 0.0, "p95_ms_max": 1e9}  # a random model fails the real floors


@pytest.fixture(scope="module")
def tiny_bundle(tmp_path_factory) -> Path:
    """A tiny random PcbVlm exported to an ONNX bundle (input 128, 2 decoder layers)."""
    pytest.importorskip("torch")
    from pcbedge.export.exporter import export_model
    from pcbedge.families.pcbvlm.testing import tiny_pcbvlm

    root = tmp_path_factory.mktemp("bench")
    model = tiny_pcbvlm(root)
    return export_model(model, root / "bundle", check=False, progress=False)


def _built_copy(bundle: Path, dest: Path, *, gates: dict, reference: Path | None,
                sha: str | None = None) -> Path:
    """A copy of ``bundle`` whose manifest carries a target and a reference block, as a bundle
    from ``pcbedge build`` does (manifest.json is not in its own file list, so this stays
    verifiable)."""
    from pcbedge.benchmarks.environment import manifest_sha256

    shutil.copytree(bundle, dest)
    m = json.loads((dest / "manifest.json").read_text())
    m["target"] = {"name": "test-target", "arch": os.uname().machine, "gates": gates}
    if reference is not None:
        m["reference"] = {"path": str(reference),
                          "manifest_sha256": sha or manifest_sha256(reference)}
    (dest / "manifest.json").write_text(json.dumps(m))
    return dest


def _read_report(out: Path) -> dict:
    return json.loads((out / "report.json").read_text())


# ----------------------------------------------------------------------------- end to end

@pytest.mark.covers("pcbvlm", "bench")
def test_report_schema_and_outputs(tiny_bundle, tmp_path):
    out = tmp_path / "out"
    report = run_benchmark(tiny_bundle, out_dir=out, gates=OPEN_GATES, **FAST)
    on_disk = _read_report(out)
    assert on_disk["passed"] is True and report["passed"] is True
    assert on_disk["schema_version"] == 1 and on_disk["question_split"] == QUESTION_SPLIT
    for k in ("p50", "p90", "p95", "p99", "max", "mean", "n", "p95_bound"):
        assert k in on_disk["latency_ms"]
    assert on_disk["latency_ms"]["n"] >= FAST["queries"]
    assert set(on_disk["latency_ms_by_kind"]) <= set(ALL_KINDS)
    assert {"vision", "prefill", "decode", "total"} <= set(on_disk["latency_ms_by_stage"])
    for k in ("cold_start_ms", "throughput_qps", "peak_rss_mb", "rss_growth_mb"):
        assert isinstance(on_disk[k], (int, float)), k
    a = on_disk["accuracy"]
    for k in ("deeppcb_map", "deeppcb_f", "map_05", "per_type_ap_033", "per_type_ap_05",
              "count_exact_match", "hallucination_rate", "ece", "ece_bins", "where_accuracy",
              "count_accuracy", "exists_accuracy", "exists_f1", "intent_accuracy"):
        assert k in a, k
    assert set(on_disk["gates"]) == set(gates_mod.GATE_NAMES)
    env = on_disk["environment"]
    assert env["manifest_sha256"] and env["arch"] and env["onnxruntime_version"]
    # no reference anywhere: drift is absent, said so, and the drift gates are skipped
    assert on_disk["drift"]["available"] is False and on_disk["drift"]["reason"]
    assert on_disk["gates"]["max_map_drop"]["status"] == "skipped"
    assert on_disk["gates"]["max_map_drop"]["passed"] is None
    lines = (out / "predictions.jsonl").read_text().splitlines()
    assert len(lines) == FAST["max_boards"]
    assert set(json.loads(lines[0])) == {"id", "image", "defects"}
    assert (out / "report.html").read_text().startswith("<!DOCTYPE html>")


def test_impossible_gate_fails_after_writing_everything(tiny_bundle, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(GateFailed, match="p95_ms_max") as err:
        run_benchmark(tiny_bundle, out_dir=out, gates={**OPEN_GATES, "p95_ms_max": 0.001},
                      **FAST)
    assert err.value.exit_code == 3
    report = _read_report(out)
    assert report["passed"] is False and report["failed_gates"] == ["p95_ms_max"]
    assert report["gates"]["p95_ms_max"]["passed"] is False
    assert (out / "predictions.jsonl").is_file() and (out / "report.html").is_file()


def test_unknown_gate_name_is_refused_before_running(tmp_path):
    with pytest.raises(PcbEdgeError, match="valid gates: p95_ms_max") as err:
        run_benchmark(tmp_path, out_dir=tmp_path / "out", gates={"p95_ms": 100}, **FAST)
    assert not isinstance(err.value, GateFailed)
    assert not (tmp_path / "out").exists()
    with pytest.raises(PcbEdgeError, match="min_map"):
        run_benchmark(tmp_path, out_dir=tmp_path / "out", gates={"min_map": -1}, **FAST)


def test_bench_against_itself_has_no_drift(tiny_bundle, tmp_path):
    """The manifest's reference block and target gates are used when nothing is passed."""
    built = _built_copy(tiny_bundle, tmp_path / "built", reference=tiny_bundle,
                        gates={"p95_ms_max": 1e9, "min_map": 0.0, "max_map_drop": 0.0,
                               "max_count_drop": 0.0, "max_hallucination_rise": 0.0,
                               "max_question_drop": 0.0})
    report = run_benchmark(built, out_dir=tmp_path / "out", **FAST)
    drift = report["drift"]
    assert drift["available"] is True and drift["answer_agreement"] == 1.0
    assert drift["intent_agreement"] == 1.0
    for k, v in drift["delta"].items():
        values = v.values() if isinstance(v, dict) else [v]
        assert all(x in (None, 0.0) for x in values), (k, v)
    assert report["passed"] is True
    assert all(g["source"] == "target profile 'test-target'" for g in report["gates"].values())
    assert report["gates"]["max_map_drop"] == {**report["gates"]["max_map_drop"],
                                               "value": 0.0, "passed": True}


def test_no_reference_skips_the_reference_the_manifest_names(tiny_bundle, tmp_path):
    """reference=False (--no-reference): a model too large to hold its float reference on the
    bench box is timed and scored alone; the drift gates are skipped, not failed."""
    built = _built_copy(tiny_bundle, tmp_path / "built", reference=tiny_bundle,
                        gates={"p95_ms_max": 1e9, "min_map": 0.0, "max_map_drop": 0.0})
    report = run_benchmark(built, reference=False, out_dir=tmp_path / "out", **FAST)
    assert report["drift"]["available"] is False
    assert "--no-reference" in report["drift"]["reason"]
    assert report["gates"]["max_map_drop"]["status"] == "skipped"
    assert report["gates"]["p95_ms_max"]["status"] == "passed" and report["passed"] is True
    r = subprocess.run([sys.executable, "-m", "pcbedge", "bench", str(built), "--no-reference",
                        "--reference", str(tiny_bundle), "--out", str(tmp_path / "o2")],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "contradict" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "o2").exists()


def test_bench_a_built_bundle_with_its_profile_gates(tiny_bundle, tmp_path):
    """A real x86-cpu build: limits from its profile, the FP32 export found via its manifest."""
    from pcbedge.recipes.build import build_bundle

    built = build_bundle("x86-cpu", tiny_bundle, tmp_path / "x86-cpu", progress=False)
    try:  # a random model's int8 drift may well miss a gate; the limits are what is checked
        run_benchmark(built, out_dir=tmp_path / "out", gates={"min_map": 0.0}, **FAST)
    except GateFailed:
        pass
    report = _read_report(tmp_path / "out")
    g = report["gates"]
    assert g["p95_ms_max"]["limit"] == 300.0
    assert g["p95_ms_max"]["source"] == "target profile 'x86-cpu'"
    assert g["min_map"]["source"] == "override"
    drift = report["drift"]
    assert drift["available"] is True and drift["chosen"].startswith("manifest:")
    assert 0.0 <= drift["answer_agreement"] <= 1.0
    assert report["environment"]["target"] == "x86-cpu"
    assert "int8" in report["environment"]["precision"]


def test_reference_with_another_hash_is_refused(tiny_bundle, tmp_path):
    built = _built_copy(tiny_bundle, tmp_path / "built", reference=tiny_bundle, gates={},
                        sha="0" * 64)
    with pytest.raises(BundleError, match="manifest sha256"):
        run_benchmark(built, out_dir=tmp_path / "out", **FAST)
    with pytest.raises(BundleError, match="not found"):
        run_benchmark(tiny_bundle, reference=tmp_path / "missing", out_dir=tmp_path / "o", **FAST)


def test_list_file_subset(tiny_bundle, tmp_path, sample_data):
    lines = (sample_data / "bench.txt").read_text().splitlines()
    subset = tmp_path / "subset.txt"
    subset.write_text("\n".join([lines[5], lines[40]]) + "\n")
    report = run_benchmark(tiny_bundle, data=sample_data, list_file=subset, gates=OPEN_GATES,
                           out_dir=tmp_path / "out", **{**FAST, "max_boards": None})
    assert report["workload"]["n_boards"] == 2
    preds = (tmp_path / "out" / "predictions.jsonl").read_text().splitlines()
    ids = [json.loads(x)["id"] for x in preds]
    assert [i.split("/")[1] for i in ids] == [Path(lines[k].split()[0]).stem for k in (5, 40)]
    # a board is asked the same questions whatever else is in the list
    full = load_workload()
    sub = load_workload(sample_data, subset)
    full_qs = {full.boards[q.board_index].id: [] for q in full.queries}
    for q in full.queries:
        full_qs[full.boards[q.board_index].id].append(q.qa)
    for i, b in enumerate(sub.boards):
        assert [q.qa for q in sub.board_queries(i)] == full_qs[b.id]


def test_sweep_and_robustness_tables(tiny_bundle, tmp_path):
    report = run_benchmark(tiny_bundle, out_dir=tmp_path / "out", gates=OPEN_GATES, sweep=True,
                           robustness=True, reference=tiny_bundle,
                           **{**FAST, "max_boards": 2, "queries": 4})
    rows = report["sweep"]
    assert [r["keep_ratio"] for r in rows] == [1.0, 0.5, 0.25, 0.1]  # the reference is the bundle
    for r in rows:
        for k in ("label", "precision", "keep_ratio", "deeppcb_map", "count_exact_match",
                  "hallucination_rate", "p50_ms", "p95_ms"):
            assert k in r, k
    conds = report["robustness"]["conditions"]
    assert {"jpeg_q30", "template_shift_2px", "template_shift_4px"} <= set(conds)
    for row in conds.values():
        assert {"deeppcb_map", "count_exact_match", "mean_confidence",
                "deeppcb_map_ratio"} <= set(row)
    assert "Accuracy vs P95 latency" in (tmp_path / "out/report.html").read_text()


def test_bench_of_a_bundle_never_imports_torch(tiny_bundle, tmp_path):
    """The device side has no torch: benching an ONNX bundle must not need it."""
    probe = (f"import sys; from pcbedge.benchmarks.harness import run_benchmark; "
             f"run_benchmark({str(tiny_bundle)!r}, out_dir={str(tmp_path / 'out')!r}, "
             f"gates={OPEN_GATES!r}, queries=2, min_seconds=0.0, warmup=0, max_boards=1, "
             f"progress=False); print('TORCH' if 'torch' in sys.modules else 'NO-TORCH')")
    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(repo) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, "-c", probe], cwd=repo, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "NO-TORCH"


class OracleRunner(Runner):
    """A stub runner that answers every bench question from the DeepPCB annotations, so every
    accuracy figure of the harness must come out perfect (checks the scoring end to end)."""

    input_size = 64

    def __init__(self, workload: Workload):
        from pcbedge.data.preprocess import load_pair
        self.manifest = {"input_size": self.input_size}
        self.truth = {}
        for i, b in enumerate(workload.boards):
            x, _ = load_pair(b.test_path, b.template_path, self.input_size)
            for q in workload.board_queries(i):
                self.truth[(x.tobytes(), q.qa.question)] = (b, q.qa)

    def prepare(self, image, template=None):
        from pcbedge.data.preprocess import load_pair, prepare_pair
        if isinstance(image, (str, Path)):
            return Prepared(*load_pair(image, template, self.input_size))
        return Prepared(*prepare_pair(image, template, self.input_size, ("a", "b")))

    def encode(self, prepared):
        return Encoded(prepared.inputs.tobytes(), prepared)

    def answer(self, enc, question, **kw):
        from pcbedge.benchmarks.workload import board_size
        from pcbedge.data.query import arrange, select
        board, qa = self.truth[(enc.outputs, question)]
        program = qa.meaning()
        every = [{"type": d.type, "bbox": list(d.bbox), "confidence": 0.9, "region": k}
                 for k, d in enumerate(board.defects)]
        defects = arrange(program, select(program, every, *board_size(board)))
        return {"answer": "oracle", "intent": program.intent, "filter": qa.filter or "all",
                "count": len(defects), "defects": defects, "complete": True}

    def ask(self, test_path, template_path, question, **kw):
        return {**self.answer(self.encode(self.prepare(test_path, template_path)), question),
                "latency_ms": {"preprocess": 1.0, "vision": 1.0, "prefill": 1.0, "decode": 1.0,
                               "total": 4.0}}


def test_perfect_answers_score_perfectly(monkeypatch, tmp_path):
    from pcbedge.benchmarks import workload as wl

    oracle = OracleRunner(load_workload(max_boards=4))
    monkeypatch.setattr(wl, "open_runner", lambda path, **kw: oracle)
    (tmp_path / "b").mkdir()   # the out folder may not lie inside the bundle
    report = run_benchmark(tmp_path / "b", out_dir=tmp_path / "out", reference=tmp_path / "b",
                           **{**FAST, "max_boards": 4})
    a = report["accuracy"]
    for k in ("deeppcb_map", "deeppcb_f", "map_05", "count_exact_match", "where_accuracy",
              "count_accuracy", "exists_accuracy", "exists_f1", "intent_accuracy"):
        assert a[k] == pytest.approx(1.0), k
    assert set(a["question_accuracy_by_kind"]) == set(ALL_KINDS) - {"describe", "unsupported"}
    assert all(v == pytest.approx(1.0) for v in a["question_accuracy_by_kind"].values()), a
    assert a["confidence_spread_max"] == 0.0
    assert report["gates"]["max_question_drop"]["passed"] is True
    assert a["hallucination_rate"] == 0.0 and a["median_center_error_px"] == 0.0
    assert a["ece"] == pytest.approx(0.1)  # every defect right at confidence 0.9
    assert report["passed"] is True and report["drift"]["answer_agreement"] == 1.0


# ----------------------------------------------------------------------------- definitions

def _toy_workload() -> tuple[Workload, list[list[dict]]]:
    """One board with two shorts; describe, where/count/exists short, where/exists open."""
    shorts = (Defect("short", (10.0, 10.0, 30.0, 30.0)), Defect("short", (50.0, 50.0, 70.0, 80.0)))
    board = Board("b0", "g", Path("t.jpg"), Path("m.jpg"), shorts)
    qas = [QA("describe", "describe", None), QA("where short", "where", "short"),
           QA("count short", "count", "short"), QA("any short", "exists", "short"),
           QA("where open", "where", "open"), QA("any open", "exists", "open")]
    wl = Workload((board,), tuple(Query(0, q) for q in qas), Path("."), Path("l.txt"))

    def d(t, box, c=0.9):
        return {"type": t, "bbox": list(box), "confidence": c}
    good = [d("short", (11, 11, 31, 31)), d("short", (50, 50, 70, 80))]
    answers = [[
        {"intent": "describe", "count": 2, "defects": good},
        {"intent": "where", "count": 3, "defects": good + [d("open", (0, 0, 5, 5))]},
        {"intent": "where", "count": 1, "defects": good[:1]},          # wrong intent, wrong count
        {"intent": "exists", "count": 2, "defects": good},
        {"intent": "where", "count": 1, "defects": [d("open", (0, 0, 5, 5))]},
        {"intent": "exists", "count": 0, "defects": []},
    ]]
    return wl, answers


def test_question_accuracy_definitions():
    wl, answers = _toy_workload()
    a = acc.score_accuracy(wl, answers)
    assert a["deeppcb_map"] == 1.0 and a["count_exact_match"] == 1.0
    assert a["hallucination_rate"] == 0.0
    # where short: both shorts matched (the extra open is another type); where open: 1 vs 0
    assert a["where_accuracy"] == 0.5
    assert a["count_accuracy"] == 0.0
    assert a["exists_accuracy"] == 1.0 and a["exists_f1"] == 1.0
    assert a["intent_accuracy"] == pytest.approx(5 / 6)


def test_where_needs_every_box_matched():
    gt = [{"type": "short", "bbox": [10, 10, 30, 30]}, {"type": "short", "bbox": [50, 50, 70, 80]}]
    near = [{"type": "short", "bbox": [10, 10, 30, 30], "confidence": 0.9},
            {"type": "short", "bbox": [80, 80, 99, 99], "confidence": 0.8}]
    assert acc._where_correct(gt, near, "short") is False
    assert acc._where_correct([], [], "short") is True


def test_drift_agreement_tolerates_one_pixel():
    a = [{"type": "open", "bbox": [10.0, 10.0, 20.0, 20.0]}]
    assert acc._same_defects(a, [{"type": "open", "bbox": [11.0, 9.0, 20.5, 20.0]}])
    assert not acc._same_defects(a, [{"type": "open", "bbox": [11.5, 10.0, 20.0, 20.0]}])
    assert not acc._same_defects(a, [{"type": "short", "bbox": [10.0, 10.0, 20.0, 20.0]}])
    assert not acc._same_defects(a, [])


def test_gate_limits_precedence_and_evaluation():
    manifest = {"target": {"name": "t", "gates": {"p95_ms_max": 300.0, "min_map": 0.5}}}
    limits = gates_mod.resolve_limits(manifest, {"min_map": 0.2})
    assert limits["p95_ms_max"] == {"limit": 300.0, "source": "target profile 't'"}
    assert limits["min_map"] == {"limit": 0.2, "source": "override"}
    assert limits["max_map_drop"] == {"limit": 0.01, "source": "default"}
    report = {"latency_ms": {"p95": 301.0}, "accuracy": {"deeppcb_map": 0.6,
              "count_exact_match": 0.7, "hallucination_rate": 0.1},
              "drift": {"available": True, "reference_accuracy": {
                  "deeppcb_map": 0.605, "count_exact_match": 0.75, "hallucination_rate": 0.1}}}
    g = gates_mod.evaluate_gates(limits, report)
    assert g["p95_ms_max"]["passed"] is False and g["min_map"]["passed"] is True
    assert g["max_map_drop"]["passed"] is True and g["max_count_drop"]["passed"] is False
    assert g["max_hallucination_rise"]["value"] == 0.0 and g["max_hallucination_rise"]["passed"]
    assert gates_mod.failed_gates(g) == ["p95_ms_max", "max_count_drop"]


def test_hallucination_gate_counts_hallucinations_not_the_rate():
    limits = gates_mod.resolve_limits(None, None)
    ref = {"deeppcb_map": 0.95, "count_exact_match": 0.9, "hallucination_rate": 4 / 1296,
           "hallucinations_per_board": 4 / 200}
    same = {**ref, "hallucination_rate": 4 / 1295}    # one true defect fewer, same 4 false ones
    more = {**ref, "hallucination_rate": 5 / 1296, "hallucinations_per_board": 5 / 200}
    for got, ok in ((same, True), (more, False)):
        report = {"accuracy": got, "drift": {"available": True, "reference_accuracy": ref}}
        assert gates_mod.evaluate_gates(limits, report)["max_hallucination_rise"]["passed"] is ok


def test_question_drop_gate_resolves_one_question_at_most():
    """A kind of n questions cannot resolve a limit below 1 / n: on 48 questions one answer
    lost (2.1 %) passes a 2 % limit, two (4.2 %) fail; on 200 questions the plain 2 % holds."""
    from pcbedge.benchmarks.gates import evaluate_gates, resolve_limits

    def report(n, lost):
        acc = {"question_accuracy_by_kind": {"region": (n - 1 - lost) / n, "where": 1.0},
               "n_region_questions": n, "n_where_questions": n, "deeppcb_map": 0.99}
        ref = {"question_accuracy_by_kind": {"region": (n - 1) / n, "where": 1.0}}
        return {"accuracy": acc, "drift": {"available": True, "reference_accuracy": ref},
                "latency_ms": {"p95": 10.0}}

    limits = resolve_limits(None, {"max_question_drop": 0.02})
    g = evaluate_gates(limits, report(48, 1))["max_question_drop"]
    assert g["passed"] is True and abs(g["limit"] - 1 / 48) < 1e-12 and g["profile_limit"] == 0.02
    assert "region: 48 questions" in g["resolution"]
    assert evaluate_gates(limits, report(48, 2))["max_question_drop"]["passed"] is False
    g = evaluate_gates(limits, report(200, 5))["max_question_drop"]
    assert g["passed"] is False and g["limit"] == 0.02 and "resolution" not in g
    assert evaluate_gates(limits, report(200, 4))["max_question_drop"]["passed"] is True
