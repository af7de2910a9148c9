"""Output safety (issue 20): what ``--out`` may replace, disk failures at every write, SIGTERM,
the quantizer's temporary folders, and batch files checked whole.

The command-level reproductions are catalogue cases (tests/badinputs/cases_outputs.py); this
module checks the pieces directly and the behaviours a catalogue case cannot: signals sent to a
real process, where onnxruntime's temporaries go, a NaN in an answer."""
from __future__ import annotations

import errno
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from pcbedge.bundle import outputs
from pcbedge.bundle.atomic import atomic_write_json, staged_dir
from pcbedge.cli import EXIT_TERMINATED, Terminated, cli, main
from pcbedge.errors import DatasetError, OutputError
from pcbedge.testing import tiny_bundle, write_pair_images

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(REPO)}
BUNDLE_MANIFEST = '{"kind": "pcbedge-bundle", "schema_version": 1}'


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> tuple[Path, Path]:
    """(tiny model folder, its FP32 export), shared with the other test modules."""
    return tiny_bundle(tmp_path_factory.getbasetemp() / "shared-tiny-export")


def enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


# --- what --out may replace ---------------------------------------------------------------------

def test_only_what_pcbedge_made_is_replaced(tmp_path):
    check = outputs.check_destination
    empty = tmp_path / "empty"
    empty.mkdir()
    check(empty, False)                       # an empty folder, a missing one: fine
    check(tmp_path / "missing", False)
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (bundle / "manifest.json").write_text(BUNDLE_MANIFEST)
    with pytest.raises(OutputError, match="holds a pcbedge bundle"):
        check(bundle, False)
    check(bundle, True)
    interrupted = tmp_path / "interrupted"    # killed between the last two renames of a publish
    interrupted.mkdir()
    (interrupted / "manifest.json.partial").write_text(BUNDLE_MANIFEST)
    check(interrupted, True)
    for name, text in (("manifest.json", '{"kind": "web-app", "schema_version": 1}'),
                       ("manifest.json", '{"kind": "pcbedge-bundle", "schema_version": "1"}'),
                       ("manifest.json", "not json"), ("notes.txt", "mine")):
        other = tmp_path / f"other-{len(list(tmp_path.iterdir()))}"
        other.mkdir()
        (other / name).write_text(text)
        with pytest.raises(OutputError, match="not a bundle made by pcbedge"):
            check(other, True)
        assert (other / name).read_text() == text
    with pytest.raises(OutputError, match="not a bench report folder"):
        check(bundle, True, kind="bench")     # a bundle is not a bench folder, nor vice versa


def test_bench_folders_and_killed_writes_count_as_pcbedge_made(tmp_path):
    report = tmp_path / "report"
    report.mkdir()
    (report / "report.json").write_text(json.dumps({"schema_version": 1,
                                                    "title": "pcbedge bench: x86-cpu"}))
    outputs.check_destination(report, True, kind="bench")
    refused = tmp_path / "refused"           # a busy machine: junit.xml and summary.md only
    refused.mkdir()
    (refused / "junit.xml").write_text('<testsuites name="pcbedge.bench"></testsuites>')
    outputs.check_destination(refused, True, kind="bench")
    killed = tmp_path / "killed"             # a first write killed: only its temporary file
    killed.mkdir()
    (killed / ".report.json.k2x_9abc.tmp").write_text("{")
    outputs.check_destination(killed, True, kind="bench")
    with pytest.raises(OutputError, match="not a bundle made by pcbedge"):
        outputs.check_destination(report, True)


@pytest.mark.parametrize("relation", ["is", "lies inside", "contains"])
def test_out_never_overlaps_an_input(tmp_path, relation):
    data = tmp_path / "work" / "data"
    data.mkdir(parents=True)
    out = {"is": data, "lies inside": data / "out", "contains": tmp_path / "work"}[relation]
    with pytest.raises(OutputError, match=f"{relation} the data folder"):
        outputs.check_outside_inputs(out, {"data folder": data, "reference": None})
    outputs.check_outside_inputs(tmp_path / "elsewhere", {"data folder": data})


def test_symlinks_are_resolved_before_comparing(tmp_path):
    cal = tmp_path / "cal"
    cal.mkdir()
    (cal / "b0_test.png").write_bytes(b"board")
    link = tmp_path / "link"
    link.symlink_to(cal)
    with pytest.raises(OutputError, match=f"is the calibration folder.*both are {cal}"):
        outputs.check_output(link, overwrite=True, inputs={"calibration folder": cal})
    with pytest.raises(OutputError, match="not a bundle made by pcbedge"):
        with staged_dir(link, overwrite=True):   # a link to a user folder: refused, kept
            pass
    assert (cal / "b0_test.png").read_bytes() == b"board" and link.is_symlink()


def test_a_linked_bundle_is_replaced_where_it_lives(tmp_path):
    real = tmp_path / "bundles" / "x86"
    real.mkdir(parents=True)
    (real / "manifest.json").write_text(BUNDLE_MANIFEST)
    link = tmp_path / "current"
    link.symlink_to(real)
    with staged_dir(link, overwrite=True) as stage:
        (stage / "manifest.json.partial").write_text(BUNDLE_MANIFEST)
        (stage / "new.onnx").write_bytes(b"graph")
    assert link.is_symlink() and (link / "new.onnx").is_file()
    assert sorted(p.name for p in real.parent.iterdir()) == ["x86"]


def test_build_refuses_the_calibration_set_as_out_even_with_overwrite(tiny, tmp_path):
    """The issue's reproduction: ``build --calibration D --out D --overwrite`` deleted D."""
    from pcbedge.recipes.build import build_bundle
    cal = tmp_path / "cal"
    write_pair_images(cal)
    before = sorted(p.name for p in cal.iterdir())
    with pytest.raises(OutputError, match="is the calibration folder"):
        build_bundle("x86-cpu", tiny[1], cal, calibration=cal, overwrite=True, progress=False)
    assert sorted(p.name for p in cal.iterdir()) == before


# --- disk failures ------------------------------------------------------------------------------

def test_output_error_names_the_path_the_space_and_the_fix(tmp_path):
    err = outputs.output_error(OSError(errno.ENOSPC, "No space left on device"),
                               tmp_path / "out", needed=3 << 20)
    assert isinstance(err, OutputError)
    assert f"cannot write {tmp_path / 'out'}: no space left" in str(err)
    assert "needs about 3.0 MiB" in str(err) and " free)" in str(err)
    assert err.fix.startswith("free at least 3.0 MiB")
    ro = outputs.output_error(OSError(errno.EROFS, "Read-only file system"), tmp_path)
    assert "read-only" in str(ro) and "writable disk" in ro.fix
    denied = outputs.output_error(PermissionError(errno.EACCES, "Permission denied"), tmp_path)
    assert "permission denied" in str(denied)
    if hasattr(errno, "EDQUOT"):
        assert "quota" in str(outputs.output_error(OSError(errno.EDQUOT, "quota"), tmp_path))


def test_write_failures_are_found_however_they_were_rewrapped(tmp_path):
    from pcbedge.errors import CalibrationError
    disk = OSError(errno.ENOSPC, "No space left on device")
    try:
        try:
            raise disk
        except OSError:
            raise CalibrationError("calibration of vision.onnx got no input") from None
    except CalibrationError as e:
        assert outputs.write_failure(e) is disk          # the context survives "from None"
    text_only = RuntimeError("[ONNXRuntimeError] : 1 : FAIL : No space left on device")
    assert outputs.write_failure(text_only).errno == errno.ENOSPC
    reading = PermissionError(errno.EACCES, "Permission denied", str(tmp_path / "in/x.onnx"))
    assert outputs.write_failure(reading, within=(tmp_path / "out",)) is None   # an input
    writing = PermissionError(errno.EACCES, "Permission denied", str(tmp_path / "out/x.onnx"))
    assert outputs.write_failure(writing, within=(tmp_path / "out",)) is writing
    assert outputs.write_failure(ValueError("bad shape")) is None


def test_staged_dir_maps_a_full_disk_and_leaves_nothing(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(OutputError,
                       match=r"cannot write .*out: no space left.*needs about 1\.0 MiB"):
        with staged_dir(out, needed=1 << 20) as stage:
            (stage / "vision.onnx").write_bytes(b"x" * 1000)
            try:
                enospc()
            except OSError as e:   # a quantizer that re-types the failure
                raise ValueError("quantizing vision.onnx failed") from e
    assert list(tmp_path.iterdir()) == []


def test_atomic_json_writes_are_standard_json(tmp_path, monkeypatch):
    path = tmp_path / "report.json"
    atomic_write_json(path, {"p95": float("nan"), "drift": [float("inf"), 1.5, -float("inf")]})
    assert json.loads(path.read_text(), parse_constant=pytest.fail) == {
        "p95": None, "drift": [None, 1.5, None]}
    monkeypatch.setattr(os, "fsync", enospc)
    with pytest.raises(OutputError, match=r"report\.json: no space left.*needs about 8 bytes"):
        atomic_write_json(path, [1])
    assert [p.name for p in tmp_path.iterdir()] == ["report.json"]


def test_quantizer_disk_failure_is_not_a_calibration_error(tiny, tmp_path, monkeypatch):
    """A quantizer failing before it read any feed was "calibration got no input"."""
    import onnxruntime.quantization as ortq

    from pcbedge.recipes.configs import StaticInt8Config
    from pcbedge.recipes.quantize import quantize_graph
    monkeypatch.setattr(ortq, "quantize_static", enospc)
    with pytest.raises(OSError) as err:
        quantize_graph(tiny[1] / "vision.onnx", tmp_path / "q" / "vision.onnx",
                       StaticInt8Config(preprocess=False), calibration=iter([]))
    assert err.value.errno == errno.ENOSPC


# --- the quantizer's temporary folders ----------------------------------------------------------

def test_quantizer_temporaries_live_in_the_staging_folder(tiny, tmp_path, monkeypatch):
    from pcbedge.recipes.build import build_bundle
    system_tmp = tmp_path / "system-tmp"
    system_tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(system_tmp))
    made = []
    real_mkdtemp = tempfile.mkdtemp

    def spy(*args, **kwargs):
        made.append(Path(real_mkdtemp(*args, **kwargs)))
        return str(made[-1])

    monkeypatch.setattr(tempfile, "mkdtemp", spy)
    out = tmp_path / "bundles" / "x86"
    build_bundle("x86-cpu", tiny[1], out, progress=False)
    ort = [p for p in made if p.name.startswith(("ort.quant.", "pre.quant."))]
    assert ort, "onnxruntime made no temporary folder: the test no longer sees it"
    assert all(p.relative_to(out.parent).parts[0].startswith(".x86.staging-") for p in ort), ort
    assert not [p for p in system_tmp.iterdir() if p.name.startswith(("ort.quant.", "pre.quant."))]
    assert tempfile.tempdir == str(system_tmp)
    assert sorted(p.name for p in out.parent.iterdir()) == ["x86"]


def pcbedge(*args) -> list[str]:
    return [sys.executable, "-m", "pcbedge", *map(str, args)]


def test_sigkill_during_calibration_leaks_no_ort_quant_folder(tiny, tmp_path):
    system_tmp = tmp_path / "system-tmp"
    system_tmp.mkdir()
    out = tmp_path / "b" / "x86"
    argv = pcbedge("build", "--target", "x86-cpu", "--export", tiny[1], "--out", out)
    proc = subprocess.Popen(argv, cwd=tmp_path, env={**ENV, "TMPDIR": str(system_tmp)},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    seen = None
    try:
        deadline = time.time() + 240
        while seen is None and proc.poll() is None and time.time() < deadline:
            seen = next(iter([*out.parent.glob(".x86.staging-*/.quant-*/ort.quant.*"),
                              *system_tmp.glob("ort.quant.*")]), None)
            time.sleep(0.005)
    finally:
        proc.kill()
        proc.wait()
    if seen is None:
        pytest.skip("the build passed its quantization before an ort.quant folder was seen")
    assert not [p for p in system_tmp.iterdir() if p.name.startswith(("ort.quant.", "pre.quant."))]
    subprocess.run(argv, cwd=tmp_path, env=ENV, check=True, capture_output=True, timeout=300)
    assert sorted(p.name for p in out.parent.iterdir()) == ["x86"]   # the stage went too


# --- SIGTERM ------------------------------------------------------------------------------------

def terminate_at(argv, cwd: Path, watch, delay: float) -> subprocess.CompletedProcess:
    """Run ``argv``; once ``watch()`` is true (the command is writing), wait ``delay`` s and
    send SIGTERM (unless it finished)."""
    proc = subprocess.Popen(argv, cwd=cwd, env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while proc.poll() is None and not watch() and time.time() < deadline:
        time.sleep(0.01)
    time.sleep(delay)
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    return subprocess.CompletedProcess(argv, proc.returncode, stdout, stderr)


def assert_finished_or_clean(proc, out: Path) -> str:
    hidden = [p.name for p in out.parent.iterdir() if p != out]
    if proc.returncode == 0:
        assert (out / "manifest.json").is_file() if out.is_dir() else out.is_file()
        assert hidden == []
        return "finished"
    assert proc.returncode == EXIT_TERMINATED, proc.stderr[-2000:]
    assert proc.stderr.rstrip().endswith("terminated (SIGTERM)"), proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert hidden == [], hidden                 # no staging folder, no temporary file
    if out.exists():                            # the signal came after the publish
        assert (out / "manifest.json").is_file()
    return "terminated"


def test_sigterm_mid_build_cleans_up_with_exit_143(tiny, tmp_path):
    rng = random.Random(2026)
    results = []
    for i in range(3):
        out = tmp_path / f"run{i}" / "x86"
        out.parent.mkdir()
        proc = terminate_at(
            pcbedge("build", "--target", "x86-cpu", "--export", tiny[1], "--out", out),
            tmp_path, lambda: any(out.parent.glob(".x86.staging-*")), rng.uniform(0, 1.5))
        results.append(assert_finished_or_clean(proc, out))
    assert "terminated" in results, results


def test_sigterm_mid_batch_writes_no_answers(tiny, tmp_path):
    test, temp = write_pair_images(tmp_path / "pair")
    batch = tmp_path / "pair" / "in.jsonl"
    batch.write_text("".join(json.dumps({"id": i, "image": test.name, "template": temp.name,
                                         "question": "where are the shorts?"}) + "\n"
                             for i in range(5000)))
    out = tmp_path / "answers" / "out.jsonl"
    out.parent.mkdir()
    proc = terminate_at(pcbedge("ask", tiny[1], "--batch", batch, "--out", out), tmp_path,
                        lambda: any(out.parent.glob(".out.jsonl.*")), 0.3)
    assert assert_finished_or_clean(proc, out) == "terminated"
    assert not out.exists()


def test_signals_wait_until_the_publish_renames_are_done():
    """An interrupt between moving the old bundle aside and renaming the new one into place
    would leave neither: the renames run with SIGINT and SIGTERM held back."""
    from pcbedge.bundle.atomic import _signals_held
    seen = []

    def handler(signum, frame):
        seen.append("handled")
        raise Terminated()

    old = signal.signal(signal.SIGTERM, handler)
    try:
        with pytest.raises(Terminated):
            with _signals_held():
                signal.raise_signal(signal.SIGTERM)
                seen.append("renamed")
        assert seen == ["renamed", "handled"] and signal.getsignal(signal.SIGTERM) is handler
    finally:
        signal.signal(signal.SIGTERM, old)


def test_terminated_is_an_interrupt_with_its_own_exit_code(monkeypatch):
    from pcbedge import api

    def terminated(*args, **kwargs):
        raise Terminated()

    monkeypatch.setattr(api, "list_targets", terminated)
    result = CliRunner().invoke(cli, ["targets"])
    assert result.exit_code == EXIT_TERMINATED == 143
    assert result.output.strip() == "terminated (SIGTERM)"
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(SystemExit) as exc:
        main(["targets"])
    assert exc.value.code == 143 and signal.getsignal(signal.SIGTERM) is before


# --- batches ------------------------------------------------------------------------------------

class CountingRunner:
    def __init__(self, answer: dict | None = None):
        self.asked = 0
        self.answer = answer or {"answer": "none", "defects": []}

    def ask(self, image, template, question, **kw):
        self.asked += 1
        return dict(self.answer)


@pytest.fixture
def counting(monkeypatch):
    from pcbedge import api
    runner = CountingRunner()
    monkeypatch.setattr(api, "load_runner", lambda path=None, **kw: runner)
    return runner


def write_batch(folder: Path, lines: list[str]) -> Path:
    write_pair_images(folder)
    batch = folder / "in.jsonl"
    batch.write_text("".join(line + "\n" for line in lines))
    return batch


def good(i) -> str:
    return json.dumps({"id": i, "image": "board_test.png", "template": "board_temp.png",
                       "question": "any shorts?"})


@pytest.mark.parametrize("ident, words", [
    ("NaN", "NaN is not valid JSON"), ("Infinity", "Infinity is not valid JSON"),
    ("-Infinity", "-Infinity is not valid JSON"), ("1e999", "id inf is not"),
    ("true", "id True is not"), ("null", "id None is not"), ("[1]", "id [1] is not"),
    ('{"a": NaN}', "NaN is not valid JSON")])
def test_batch_ids_are_strings_or_finite_numbers(counting, tmp_path, ident, words):
    batch = write_batch(tmp_path / "pair", [good(1), good(2).replace('"id": 2', f'"id": {ident}')])
    out = tmp_path / "answers.jsonl"
    result = CliRunner().invoke(cli, ["ask", "--batch", str(batch), "--out", str(out)])
    assert result.exit_code == DatasetError.exit_code, result.output
    assert "in.jsonl line 2" in result.output and words in result.output
    assert counting.asked == 0 and not out.exists()


def test_a_bad_last_line_is_found_before_any_answer(counting, tmp_path):
    lines = [good(i) for i in range(50)]
    lines.append(good(50).replace("board_test.png", "gone_test.png"))
    batch = write_batch(tmp_path / "pair", lines)
    out = tmp_path / "answers.jsonl"
    result = CliRunner().invoke(cli, ["ask", "--batch", str(batch), "--out", str(out)])
    assert result.exit_code == 11 and "line 51 (id 50)" in result.output, result.output
    assert counting.asked == 0 and not out.exists()


def test_a_nan_in_an_answer_is_written_as_null(monkeypatch, tmp_path):
    import numpy as np

    from pcbedge import api
    runner = CountingRunner({"answer": "1 short", "defects": [
        {"type": "short", "confidence": float("nan"), "bbox": np.array([1.0, 2.0, 3.0, 4.0])}]})
    monkeypatch.setattr(api, "load_runner", lambda path=None, **kw: runner)
    batch = write_batch(tmp_path / "pair", [good(1), good("b-2")])
    out = tmp_path / "answers.jsonl"
    result = CliRunner().invoke(cli, ["ask", "--batch", str(batch), "--out", str(out)])
    assert result.exit_code == 0, result.output
    rows = [json.loads(x, parse_constant=pytest.fail) for x in out.read_text().splitlines()]
    assert [r["id"] for r in rows] == [1, "b-2"]
    assert rows[0]["defects"][0] == {"type": "short", "confidence": None,
                                     "bbox": [1.0, 2.0, 3.0, 4.0]}
