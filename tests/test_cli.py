"""The CLI shell: verbs, exit codes of typed errors, ask's single / batch / --show paths.

The API verbs are monkeypatched where the real work (export, build, models) is not needed; the
errors still come from the real code where the test is about them (load_pair for images).
"""
from __future__ import annotations

import json

import pytest
from click.testing import CliRunner
from PIL import Image

from pcbedge import __version__, api, errors
from pcbedge.cli import cli, main
from pcbedge.targets import shipped_names

VERBS = ("export", "build", "bench", "ask", "finetune", "targets")
SAMPLE_BOARD = "group00041/00041/00041000"


def run(*args: str):
    return CliRunner().invoke(cli, list(args))


class StubRunner:
    """Answers every question with one fixed defect, after really loading the pair."""

    def __init__(self):
        self.calls = []

    def ask(self, image, template, question, **kw):
        from pcbedge.data.preprocess import load_pair
        _, meta = load_pair(image, template)
        self.calls.append((str(image), str(template), question, kw))
        box = [10.0, 20.0, 60.0, 80.0]
        return {"answer": f"Found 1 short (asked: {question})", "intent": "where", "count": 1,
                "defects": [{"type": "short", "bbox": box, "center": [35.0, 50.0],
                             "confidence": 0.9, "region": 0}],
                "size": [meta.orig_w, meta.orig_h]}


@pytest.fixture
def stub_runner(monkeypatch):
    runner = StubRunner()
    seen = {}

    def load_runner(path=None, **kw):
        seen.update(path=path, **kw)
        return runner

    monkeypatch.setattr(api, "load_runner", load_runner)
    runner.seen = seen
    return runner


def test_help_lists_the_six_verbs():
    result = run("--help")
    assert result.exit_code == 0
    for verb in VERBS:
        assert f"\n  {verb} " in result.output


def test_version():
    result = run("--version")
    assert result.exit_code == 0
    assert __version__ in result.output


def test_error_exit_codes_are_distinct():
    codes = [e.exit_code for e in errors.ALL_ERRORS]
    assert len(set(codes)) == len(codes)
    assert not set(codes) & {0, 1, 2, 130}  # success, crash, click usage, interrupt


@pytest.mark.parametrize("error_type", errors.ALL_ERRORS, ids=lambda e: e.__name__)
def test_each_error_type_maps_to_its_exit_code(monkeypatch, error_type):
    def boom(*args, **kwargs):
        raise error_type("bad value 'x'; valid: 'a', 'b'", fix="pass 'a'")

    monkeypatch.setattr(api, "list_targets", boom)
    result = run("targets")
    assert result.exit_code == error_type.exit_code
    assert "error: bad value 'x'; valid: 'a', 'b'" in result.output
    assert "fix: pass 'a'" in result.output
    assert "Traceback" not in result.output


def test_main_maps_errors_without_traceback(monkeypatch, capsys):
    def boom(*args, **kwargs):
        raise errors.ModelError("model folder /nope not found", fix="pass --model DIR")

    monkeypatch.setattr(api, "list_targets", boom)
    with pytest.raises(SystemExit) as exc:
        main(["targets"])
    assert exc.value.code == errors.ModelError.exit_code
    err = capsys.readouterr().err
    assert err.startswith("error: model folder /nope not found")
    assert "Traceback" not in err


def test_keyboard_interrupt_exits_130(monkeypatch):
    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(api, "list_targets", interrupt)
    assert run("targets").exit_code == 130


def test_missing_optional_dependency_exits_21(monkeypatch):
    def no_torch(*args, **kwargs):
        raise ModuleNotFoundError("No module named 'torch'", name="torch")

    monkeypatch.setattr(api, "export_model", no_torch)
    result = run("export")
    assert result.exit_code == errors.DependencyError.exit_code
    assert "pcbedge[export]" in result.output


def test_usage_error_keeps_click_exit_code_2():
    assert run("build").exit_code == 2          # --target missing
    assert run("no-such-verb").exit_code == 2


def test_unknown_target_exits_14_listing_the_names():
    result = run("build", "--target", "raspberry-pi-zero")
    assert result.exit_code == errors.TargetError.exit_code
    assert "'raspberry-pi-zero'" in result.output
    for name in shipped_names():
        assert name in result.output


def test_targets_lists_every_shipped_profile():
    result = run("targets")
    assert result.exit_code == 0
    for name in ("x86-cpu", "arm64-cpu", "x86-cuda", "jetson-orin"):
        assert name in result.output


@pytest.mark.parametrize("report, code", [
    ({"passed": True, "gates": {}}, 0),
    ({"passed": False, "gates": {"p95_ms_max": {"passed": False, "value": 412.0}}}, 3),
])
def test_bench_exit_code_follows_the_report(monkeypatch, report, code):
    seen = {}

    def fake_bench(bundle, **kwargs):
        seen.update(kwargs, bundle=bundle)
        return report

    monkeypatch.setattr(api, "run_benchmark", fake_bench)
    result = run("bench", "bundles/x86-cpu", "--p95-ms-max", "250", "--min-map", "0.8")
    assert result.exit_code == code
    assert seen["gates"] == {"p95_ms_max": 250.0, "min_map": 0.8}
    if code:
        assert "p95_ms_max" in result.output


def test_bench_gate_failed_raised_by_the_harness_exits_3(monkeypatch):
    def fake_bench(bundle, **kwargs):
        raise errors.GateFailed("max_map_drop missed: 0.03 > 0.01")

    monkeypatch.setattr(api, "run_benchmark", fake_bench)
    assert run("bench", "bundles/x86-cpu").exit_code == 3


@pytest.fixture
def sample_pair(sample_data):
    test = sample_data / f"{SAMPLE_BOARD}_test.jpg"
    temp = sample_data / f"{SAMPLE_BOARD}_temp.jpg"
    if not test.is_file() or not temp.is_file():
        pytest.skip("needs the embedded sample pcbedge/data/sample (scripts/make_sample.py)")
    return test, temp


def test_ask_missing_image_exits_11(stub_runner, sample_pair, tmp_path):
    _, temp = sample_pair
    result = run("ask", "--image", str(tmp_path / "nope.jpg"), "--template", str(temp),
                 "where is the short?")
    assert result.exit_code == errors.InputImageError.exit_code
    assert "nope.jpg" in result.output
    assert "Traceback" not in result.output


def test_ask_single_question(stub_runner, sample_pair):
    test, temp = sample_pair
    result = run("ask", "--image", str(test), "--template", str(temp), "where is the short?")
    assert result.exit_code == 0, result.output
    assert result.output.strip() == "Found 1 short (asked: where is the short?)"
    assert stub_runner.seen == {"path": None, "threads": None}

    result = run("ask", "--image", str(test), "--template", str(temp), "--json",
                 "--max-new-tokens", "8", "any shorts?")
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["defects"][0]["type"] == "short"
    assert stub_runner.calls[-1][3] == {"max_new_tokens": 8}


def test_ask_takes_a_bundle_folder(stub_runner, sample_pair, tmp_path):
    test, temp = sample_pair
    result = run("ask", str(tmp_path), "--image", str(test), "--template", str(temp),
                 "--threads", "2", "count the shorts")
    assert result.exit_code == 0, result.output
    assert stub_runner.seen == {"path": tmp_path, "threads": 2}


def test_ask_show_draws_the_boxes(stub_runner, sample_pair, tmp_path):
    test, temp = sample_pair
    out = tmp_path / "shown.png"
    result = run("ask", "--image", str(test), "--template", str(temp), "--show", str(out),
                 "shorts?")
    assert result.exit_code == 0, result.output
    with Image.open(out) as drawn, Image.open(test) as board:
        assert drawn.size == board.size
        assert drawn.convert("RGB").getpixel((10, 50)) == (255, 225, 25)  # the box's left edge
    assert [p.name for p in tmp_path.iterdir()] == ["shown.png"]  # no temp file left


def test_ask_batch_writes_jsonl_with_ids(stub_runner, sample_pair, tmp_path):
    test, temp = sample_pair
    batch = tmp_path / "in.jsonl"
    lines = [{"id": i, "image": str(test), "template": str(temp), "question": q}
             for i, q in enumerate(["where is the short?", "any opens?"])]
    batch.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    out = tmp_path / "answers" / "out.jsonl"
    result = run("ask", "--batch", str(batch), "--out", str(out))
    assert result.exit_code == 0, result.output
    answers = [json.loads(x) for x in out.read_text().splitlines()]
    assert [a["id"] for a in answers] == [0, 1]
    assert answers[1]["answer"].endswith("any opens?)")


@pytest.mark.parametrize("bad_line, code, words", [
    ("{not json", 12, ["line 2", "not valid JSON"]),
    ('{"id": 1, "image": "a.jpg"}', 12, ["line 2", "template", "question"]),
    ('{"id": 0, "image": "a.jpg", "template": "b.jpg", "question": "q"}', 12,
     ["line 2", "repeats line 1"]),
    ('{"id": 1, "image": "missing.jpg", "template": "T", "question": "q"}', 11,
     ["line 2", "missing.jpg"]),
])
def test_ask_batch_bad_line_names_the_line(stub_runner, sample_pair, tmp_path, bad_line, code,
                                           words):
    test, temp = sample_pair
    batch = tmp_path / "in.jsonl"
    first = {"id": 0, "image": str(test), "template": str(temp), "question": "any shorts?"}
    second = bad_line.replace('"T"', json.dumps(str(temp)))
    batch.write_text(json.dumps(first) + "\n" + second + "\n")
    out = tmp_path / "out.jsonl"
    result = run("ask", "--batch", str(batch), "--out", str(out))
    assert result.exit_code == code, result.output
    for word in words:
        assert word in result.output
    assert not out.exists()  # atomic: nothing half-written
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl"]


def test_ask_usage_errors(stub_runner, tmp_path):
    assert run("ask", "where?").exit_code == 2                          # no --image/--template
    assert run("ask", "--batch", str(tmp_path / "in.jsonl")).exit_code == 2  # no --out
    result = run("ask", "bundles/typo", "--image", "a", "--template", "b")
    assert result.exit_code == errors.BundleError.exit_code


def test_finetune_passes_only_the_given_options(monkeypatch, tmp_path):
    seen = {}

    def fake_finetune(data_dir, out_dir, **kwargs):
        seen.update(kwargs, data_dir=data_dir, out_dir=out_dir)

    monkeypatch.setattr(api, "finetune", fake_finetune)
    result = run("finetune", "--data", str(tmp_path), "--out", str(tmp_path / "m"), "--seed", "3")
    assert result.exit_code == 0, result.output
    assert seen == {"seed": 3, "data_dir": tmp_path, "out_dir": tmp_path / "m"}
