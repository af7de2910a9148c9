"""``bench --resume``: answers kept per board, reused by a rerun, never reused across models or
questions, a torn line tolerated, and the figures of a resumed run equal a fresh run's."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from pcbedge.benchmarks.answer_cache import FOLDER, HEADER, AnswerCache
from pcbedge.benchmarks.harness import run_benchmark
from pcbedge.errors import OutputError

FAST = {"queries": 2, "min_seconds": 0.0, "warmup": 0, "max_boards": 3, "progress": False,
        "gates": {"min_map": 0.0, "p95_ms_max": 1e9}}


@pytest.fixture(scope="module")
def tiny_bundle(tmp_path_factory) -> Path:
    pytest.importorskip("torch")
    from pcbedge.export.exporter import export_model
    from pcbedge.families.pcbvlm.testing import tiny_pcbvlm

    root = tmp_path_factory.mktemp("resume")
    return export_model(tiny_pcbvlm(root), root / "bundle", check=False, progress=False)


def _lines(path: Path) -> list[str]:
    return [x for x in path.read_text().splitlines() if x.strip()]


def _figures(report: dict) -> tuple:
    return (report["accuracy"], report["drift"]["delta"], report["drift"]["answer_agreement"])


@pytest.mark.covers("pcbvlm", "bench")
def test_resume_reuses_every_board_and_gives_the_same_figures(tiny_bundle, tmp_path):
    fresh = run_benchmark(tiny_bundle, reference=tiny_bundle, out_dir=tmp_path / "fresh", **FAST)
    out = tmp_path / "out"
    first = run_benchmark(tiny_bundle, reference=tiny_bundle, out_dir=out, resume=True, **FAST)
    assert first["answers_reused"] == {"bundle": 0, "reference": 0}
    for role in ("bundle", "reference"):
        lines = _lines(out / FOLDER / f"{role}.jsonl")
        assert json.loads(lines[0]) == HEADER and len(lines) == 1 + 3
    again = run_benchmark(tiny_bundle, reference=tiny_bundle, out_dir=out, resume=True, **FAST)
    assert again["answers_reused"] == {"bundle": 3, "reference": 3}
    assert _figures(again) == _figures(first) == _figures(fresh)
    assert len(_lines(out / FOLDER / "bundle.jsonl")) == 1 + 3    # nothing appended twice


def test_a_torn_line_is_answered_again(tiny_bundle, tmp_path):
    out = tmp_path / "out"
    first = run_benchmark(tiny_bundle, reference=tiny_bundle, out_dir=out, resume=True, **FAST)
    cache = out / FOLDER / "bundle.jsonl"
    lines = _lines(cache)
    # a kill during board 3's write: header, board 1, board 2, half of board 3; no report yet
    cache.write_text("\n".join(lines[:3]) + "\n" + lines[3][: len(lines[3]) // 2])
    for name in ("report.json", "junit.xml", "summary.md", "report.html", "predictions.jsonl"):
        (out / name).unlink()
    again = run_benchmark(tiny_bundle, reference=tiny_bundle, out_dir=out, resume=True, **FAST)
    assert again["answers_reused"]["bundle"] == 2
    assert _figures(again) == _figures(first)
    reread = AnswerCache(out, "bundle", tiny_bundle)
    assert len(reread._done) == 3                # the re-answered board parses after the tear


def test_another_model_or_question_set_is_not_reused(tiny_bundle, tmp_path):
    out = tmp_path / "out"
    run_benchmark(tiny_bundle, reference=tiny_bundle, out_dir=out, resume=True, **FAST)
    cache = AnswerCache(out, "bundle", tiny_bundle)
    from pcbedge.benchmarks.workload import load_workload
    wl = load_workload(max_boards=1)
    board = wl.boards[0]
    qs = [q.qa.question for q in wl.board_queries(0)]
    assert cache.get(cache.key(board, qs)) is not None
    assert cache.get(cache.key(board, qs[:-1])) is None            # other questions
    other = AnswerCache(out, "bundle", tmp_path)                   # another model's identity
    assert other.get(other.key(board, qs)) is None


def test_interrupted_folder_is_accepted_and_foreign_folder_refused(tiny_bundle, tmp_path):
    out = tmp_path / "out"
    (out / FOLDER).mkdir(parents=True)
    (out / FOLDER / "bundle.jsonl").write_text(json.dumps(HEADER) + "\n")
    run_benchmark(tiny_bundle, out_dir=out, resume=True, **FAST)   # only pcbedge's cache there
    foreign = tmp_path / "foreign"
    (foreign / FOLDER).mkdir(parents=True)
    (foreign / FOLDER / "notes.txt").write_text("mine\n")
    with pytest.raises(OutputError, match="not a bench report folder made by pcbedge"):
        run_benchmark(tiny_bundle, out_dir=foreign, resume=True, **FAST)
    assert (foreign / FOLDER / "notes.txt").read_text() == "mine\n"
