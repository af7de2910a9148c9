"""pcbedge bench as a CI citizen: machine state (a busy machine flagged, or refused with its own
exit code), JUnit XML against the common schema, the Markdown summary, log-friendly progress, and
outputs readable under the user's umask.

The busy tests spin two busy-loop processes of their own (each ends by itself after at most
SPIN_S seconds, and is killed in a finally) while a short bench of a tiny exported bundle runs.
"""
from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from pcbedge.benchmarks import ci_outputs
from pcbedge.benchmarks import machine_state as ms
from pcbedge.benchmarks.harness import run_benchmark
from pcbedge.benchmarks.progress import progress
from pcbedge.errors import MachineBusy, TargetError

FAST = {"queries": 6, "min_seconds": 1.5, "warmup": 1, "max_boards": 2, "progress": False}
OPEN_GATES = {"min_map": 0.0, "p95_ms_max": 1e9}
SPIN_S = 20
XSD = Path(__file__).parent / "data" / "junit.xsd"


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    pytest.importorskip("torch")
    from pcbedge.testing import tiny_bundle
    return tiny_bundle(tmp_path_factory.getbasetemp() / "shared-tiny-export")[1]


def _with_target(bundle: Path, dest: Path, bench: dict) -> Path:
    """A copy whose manifest carries a target profile block with ``[bench]`` settings."""
    shutil.copytree(bundle, dest)
    m = json.loads((dest / "manifest.json").read_text())
    m["target"] = {"name": "ci-box", "arch": os.uname().machine, "gates": OPEN_GATES,
                   "bench": bench}
    (dest / "manifest.json").write_text(json.dumps(m))
    return dest


class Spinners:
    """``n`` busy-loop processes, each bounded to SPIN_S seconds, killed on exit."""

    def __init__(self, n: int = 2):
        self.n, self.procs = n, []

    def __enter__(self):
        code = f"import time\nt = time.time()\nwhile time.time() - t < {SPIN_S}:\n    pass\n"
        self.procs = [subprocess.Popen([sys.executable, "-c", code]) for _ in range(self.n)]
        time.sleep(0.3)  # let them reach the run queue
        return self

    def __exit__(self, *exc):
        for p in self.procs:
            p.kill()
        for p in self.procs:
            p.wait(timeout=10)


# ----------------------------------------------------------------------------- busy machine

def test_bench_under_load_is_flagged_in_every_output(bundle, tmp_path):
    out = tmp_path / "out"
    with Spinners():
        report = run_benchmark(bundle, out_dir=out, gates=OPEN_GATES, **FAST)
    state = report["machine_state"]
    assert state["busy"] is True and state["action"] == "flag", state
    assert any("other processes used" in r or "runnable" in r for r in state["reasons"])
    assert state["before"]["other_cpu_pct_median"] > 20
    assert state["during"]["n_samples"] >= 1
    assert json.loads((out / "report.json").read_text())["machine_state"]["busy"] is True
    junit = (out / "junit.xml").read_text()
    assert 'name="machine_idle"' in junit and "machine busy:" in junit
    assert "busy machine" in (out / "summary.md").read_text().lower()
    html = (out / "report.html").read_text()
    assert 'class="busy"' in html and "Busy machine" in html
    assert report["passed"] is True  # flagged, not failed: the gates still decide the exit code


def test_refuse_setting_exits_4_and_times_nothing(bundle, tmp_path, monkeypatch):
    from pcbedge.benchmarks import workload as wl
    from pcbedge.cli import cli

    built = _with_target(bundle, tmp_path / "built", {"busy_machine": "refuse",
                                                       "max_other_cpu_pct": 20.0,
                                                       "max_other_runnable_per_cpu": 0.25})

    def never(*a, **kw):
        raise AssertionError("a runner was opened on a busy machine")
    monkeypatch.setattr(wl, "open_runner", never)
    out = tmp_path / "out"
    with Spinners():
        result = CliRunner().invoke(cli, ["bench", str(built), "--out", str(out), "--quiet",
                                          "--queries", "5", "--boards", "1"])
    assert result.exit_code == MachineBusy.exit_code == 4, result.output
    assert "refused: the machine is busy" in result.output and "fix:" in result.output
    assert not (out / "report.json").exists() and not (out / "report.html").exists()
    junit = (out / "junit.xml").read_text()
    assert 'name="machine_idle"' in junit and "<failure" in junit
    assert "Warning: busy machine" in (out / "summary.md").read_text()


def test_busy_policy_from_profile_and_override():
    m = {"target": {"name": "box", "bench": {"busy_machine": "refuse", "max_other_cpu_pct": 5.0,
                                             "max_other_runnable_per_cpu": 1.0}}}
    p = ms.resolve_policy(m)
    assert (p.action, p.max_other_cpu_pct, p.source) == ("refuse", 5.0, "target profile 'box'")
    assert ms.resolve_policy(m, "flag").action == "flag"
    assert ms.resolve_policy({}) == ms.BusyPolicy()
    with pytest.raises(Exception, match="busy_machine 'maybe'"):
        ms.resolve_policy({}, "maybe")


def test_busy_rule_on_synthetic_samples():
    quiet = ms.summarize([{"other_cpu_pct": 3.0, "other_runnable": 0}] * 5, 1.0)
    loaded = ms.summarize([{"other_cpu_pct": 60.0, "other_runnable": 2}] * 5, 1.0)
    blip = ms.summarize([{"other_cpu_pct": 90.0, "other_runnable": 3}]
                        + [{"other_cpu_pct": 1.0, "other_runnable": 0}] * 4, 1.0)
    pol = ms.BusyPolicy()
    assert ms.judge_busy(quiet, quiet, pol, ncpu=2)["busy"] is False
    assert ms.judge_busy(blip, quiet, pol, ncpu=2)["busy"] is False  # medians, not maxima
    v = ms.judge_busy(quiet, loaded, pol, ncpu=2)
    assert v["busy"] and all(r.startswith("during the latency pass") for r in v["reasons"])
    # 2 other runnable tasks are 0.125 per CPU on a 16-core box: CPU share alone decides there
    v16 = ms.judge_busy(None, ms.summarize([{"other_cpu_pct": 10.0, "other_runnable": 2}], 1.0),
                        pol, ncpu=16)
    assert v16["busy"] is False


def test_profile_bench_section(tmp_path):
    from pcbedge.targets import TARGETS_DIR, load_target

    assert load_target("x86-cpu").bench.busy_machine == "flag"
    text = (TARGETS_DIR / "x86-cpu.toml").read_text()
    path = tmp_path / "x86-cpu.toml"
    path.write_text(text + '\n[bench]\nbusy_machine = "refuse"\nmax_other_cpu_pct = 10.0\n')
    p = load_target(path)
    assert (p.bench.busy_machine, p.bench.max_other_cpu_pct) == ("refuse", 10.0)
    assert p.as_dict()["bench"]["busy_machine"] == "refuse"  # what a built manifest carries
    for bad, words in (('busy_machine = "wait"', "'flag', 'refuse'"),
                       ("max_other_cpu_pct = 150", "<= 100"), ("idle = true", "unknown key")):
        path.write_text(text + f"\n[bench]\n{bad}\n")
        with pytest.raises(TargetError, match=words):
            load_target(path)


# ----------------------------------------------------------------------------- JUnit / Markdown

def _toy_report(**extra) -> dict:
    gates = {"p95_ms_max": {"value": 412.0, "limit": 300.0, "op": "<=", "passed": False,
                            "status": "failed", "source": "target profile 'x86-cpu'"},
             "min_map": {"value": 0.93, "limit": 0.9, "op": ">=", "passed": True,
                         "status": "passed", "source": "default"},
             "max_map_drop": {"value": None, "limit": 0.01, "op": "<=", "passed": None,
                              "status": "skipped", "source": "default",
                              "reason": "no FP32 reference run"}}
    return {"bundle": "bundles/x86-cpu", "created_utc": "2026-01-02T03:04:05+00:00",
            "passed": False, "gates": gates, "latency_pass": {"elapsed_s": 12.5},
            "latency_ms": {"p50": 200.0, "p95": 412.0, "p99": 500.0, "n": 200,
                           "p95_bound": {"lower": 380.0, "upper": 450.0}},
            "accuracy": {"deeppcb_map": 0.93, "count_exact_match": 0.8, "n_boards": 50,
                         "where_accuracy": None},
            "machine_state": {"busy": False, "reasons": [], "action": "flag", "rule": "r"},
            **extra}


def _validate(text: str):
    etree = pytest.importorskip("lxml.etree", reason="lxml validates against the XSD")
    schema = etree.XMLSchema(etree.parse(str(XSD)))
    doc = etree.fromstring(text.encode())
    assert schema.validate(doc), schema.error_log
    return doc


def test_junit_validates_and_lists_each_gate():
    doc = _validate(ci_outputs.render_junit(_toy_report()))
    suites = {s.get("name"): s for s in doc.findall("testsuite")}
    gates = suites["pcbedge.bench.gates"]
    cases = {c.get("name"): c for c in gates.findall("testcase")}
    assert set(cases) == {"p95_ms_max", "min_map", "max_map_drop"}
    assert cases["p95_ms_max"].find("failure") is not None
    assert cases["min_map"].find("failure") is None and cases["min_map"].find("skipped") is None
    assert cases["max_map_drop"].find("skipped") is not None
    assert (gates.get("tests"), gates.get("failures"), gates.get("skipped")) == ("3", "1", "1")
    figures = {c.get("name") for c in suites["pcbedge.bench.figures"].findall("testcase")}
    assert {"latency_p95_ms", "deeppcb_map", "count_exact_match"} <= figures
    p95 = suites["pcbedge.bench.figures"].find("testcase[@name='latency_p95_ms']")
    assert "[380, 450]" in p95.find("system-out").text and "p95_ms_max" in \
        p95.find("system-out").text
    assert doc.get("failures") == "1"  # only the gate fails; figures are informational


def test_junit_of_a_real_run_validates(bundle, tmp_path):
    out = tmp_path / "out"
    report = run_benchmark(bundle, out_dir=out, gates=OPEN_GATES, **FAST)
    doc = _validate((out / "junit.xml").read_text())
    names = {c.get("name") for c in doc.find("testsuite[@name='pcbedge.bench.gates']")}
    assert set(report["gates"]) <= names
    assert set(report["outputs"]) >= {"junit.xml", "summary.md"}
    md = (out / "summary.md").read_text()
    assert "**PASSED**" in md and "| p95_ms_max |" in md and "### Machine" in md
    assert report["bundle_size_mb"] > 0 and report["paired"]["boards"]["id"]


def test_markdown_summary_of_a_failed_busy_run():
    md = ci_outputs.render_markdown(_toy_report(machine_state={
        "busy": True, "reasons": ["during the latency pass: other processes used 60% of the "
                                  "CPUs (limit 20%)"], "action": "flag", "rule": "r"}))
    assert md.startswith("## pcbedge bench `x86-cpu`: **FAILED**")
    assert "> **Warning: busy machine.**" in md and "60% of the CPUs" in md
    assert "| p95_ms_max | 412 | <= 300 | **FAIL** |" in md
    assert "| max_map_drop | n/a | <= 0.01 | skipped |" in md


# ----------------------------------------------------------------------------- progress, modes

def test_progress_in_a_log_is_lines_not_bar_frames(monkeypatch):
    log = io.StringIO()  # not a terminal
    monkeypatch.setenv("PCBEDGE_PROGRESS_SECONDS", "0")
    for _ in progress(range(5), desc="accuracy", unit="board", stream=log):
        pass
    bar = progress(total=3, desc="latency", unit="q", stream=log)
    for _ in range(3):
        bar.update(1)
    bar.close()
    text = log.getvalue()
    assert "\r" not in text
    assert "accuracy: progress 1/5 board" in text and "accuracy: done 5/5 board" in text
    assert text.rstrip().splitlines()[-1].startswith("latency: done 3/3 q")
    quiet = io.StringIO()
    assert list(progress([1, 2], stream=quiet, enabled=False)) == [1, 2]
    assert quiet.getvalue() == ""


def test_bench_log_has_no_bar_frames(bundle, tmp_path, capfd, monkeypatch):
    monkeypatch.setenv("PCBEDGE_PROGRESS_SECONDS", "1000")
    run_benchmark(bundle, out_dir=tmp_path / "out", gates=OPEN_GATES,
                  **{**FAST, "progress": True})
    err = capfd.readouterr().err
    assert "\r" not in err and "latency: done" in err and "accuracy: done 2/2 board" in err


def test_outputs_follow_the_umask(bundle, tmp_path, sample_data, monkeypatch):
    from pcbedge import api
    from pcbedge.cli import cli

    old = os.umask(0o022)
    try:
        out = tmp_path / "out"
        run_benchmark(bundle, out_dir=out, gates=OPEN_GATES, **FAST)
        for name in ("report.json", "predictions.jsonl", "report.html", "junit.xml",
                     "summary.md"):
            assert (out / name).stat().st_mode & 0o777 == 0o644, name

        class Stub:
            def ask(self, image, template, question, **kw):
                return {"answer": "none", "defects": []}
        monkeypatch.setattr(api, "load_runner", lambda path=None, **kw: Stub())
        board = "group00041/00041/00041000"
        batch = tmp_path / "in.jsonl"
        batch.write_text(json.dumps({"id": 1, "image": str(sample_data / f"{board}_test.jpg"),
                                     "template": str(sample_data / f"{board}_temp.jpg"),
                                     "question": "any shorts?"}) + "\n")
        result = CliRunner().invoke(cli, ["ask", "--batch", str(batch), "--out",
                                          str(tmp_path / "answers.jsonl")])
        assert result.exit_code == 0, result.output
        assert (tmp_path / "answers.jsonl").stat().st_mode & 0o777 == 0o644
    finally:
        os.umask(old)
