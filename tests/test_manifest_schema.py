"""The strict manifest schema (pcbedge.bundle.schema), the family's own fields, the graph I/O
check at session open, and the thread bounds (issue 20)."""
from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from click.testing import CliRunner

from pcbedge.bundle.manifest import read_manifest, write_manifest
from pcbedge.bundle.schema import (Int, List, Map, Num, Obj, OneOf, Str, Violation, is_built,
                                   validate_manifest)
from pcbedge.errors import BundleError, HardwareMismatchError, TargetError
from pcbedge.testing import tiny_bundle, write_pair_images

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def export(tmp_path_factory) -> Path:
    return tiny_bundle(tmp_path_factory.getbasetemp() / "shared-tiny-export")[1]


@pytest.fixture(scope="module")
def built(export, tmp_path_factory) -> Path:
    """x86-cuda: fp32 graphs, no calibration, so the build is only a copy and a manifest."""
    from pcbedge.recipes.build import build_bundle
    return build_bundle("x86-cuda", export, tmp_path_factory.mktemp("schema") / "x86-cuda",
                        progress=False)


def edited(src: Path, dst: Path, edit) -> Path:
    shutil.copytree(src, dst)
    m = json.loads((dst / "manifest.json").read_text())
    edit(m)
    (dst / "manifest.json").write_text(json.dumps(m))
    return dst


def _set(path: str, value):
    def edit(m):
        *parents, last = path.split(".")
        for k in parents:
            m = m[k]
        m[last] = value
    return edit


# --- the validator ------------------------------------------------------------------------

def test_nodes_name_the_path_value_and_range():
    spec = Obj({"a": Int(1, 8), "b": List(Map(Num(0, 1)), 1, 3), "c": Str(("x", "y")),
                "d": OneOf((Int(0, 9), Str()), nullable=True)}, required=("a",), extra=False)
    spec.check({"a": 3, "b": [{"k": 0.5}], "c": "x", "d": None}, "top")
    cases = [({"a": 9}, "top.a", 9, "from 1 to 8"),
             ({"a": True}, "top.a", True, "an integer"),
             ({"a": 1, "b": [{"k": 2}]}, "top.b[0].k", 2, "<= 1"),
             ({"a": 1, "b": []}, "top.b", [], "1 to 3 items"),
             ({"a": 1, "c": "z"}, "top.c", "z", "one of 'x', 'y'"),
             ({"a": 1, "d": [1]}, "top.d", [1], "or null")]
    for value, path, bad, expected in cases:
        with pytest.raises(Violation) as e:
            spec.check(value, "top")
        assert (e.value.path, e.value.value) == (path, bad) and expected in e.value.expected
    with pytest.raises(Violation) as e:
        spec.check({}, "top")
    assert e.value.problem == "missing" and e.value.path == "top.a"
    with pytest.raises(Violation) as e:
        spec.check({"a": 1, "typo": 2}, "top")
    assert e.value.problem == "unknown" and e.value.path == "top.typo"


def test_real_manifests_are_valid(export, built):
    for bundle in (export, built):
        m = read_manifest(bundle)
        validate_manifest(m)
    assert not is_built(read_manifest(export)) and is_built(read_manifest(built))


# --- the core fields, through read_manifest ------------------------------------------------

BAD = [
    ("input_size", 0, "'input_size' = 0"), ("input_size", -64, "'input_size' = -64"),
    ("input_size", "640", "'input_size' = '640'"), ("input_size", 100000, "from 16 to 4096"),
    ("input_size", 100, "a multiple of 32"), ("max_text_len", 0, "'max_text_len' = 0"),
    ("max_text_len", 40, "at least max_question_tokens (48)"),
    ("max_text_len", 500, "at most kv_cache.max_positions (96)"),
    ("runtime.threads", 100000, "'runtime.threads' = 100000"),
    ("runtime.threads", 0, "from 1 to 256"), ("runtime.thread", 2, "'runtime.thread' is not a"),
    ("runtime.engine", "tflite", "one of 'onnxruntime', 'tensorrt'"),
    ("kv_cache.num_layers", 100000, "'kv_cache.num_layers' = 100000"),
    ("precision.audio", "fp32", "'precision.audio' is not a known field"),
    ("graphs.vision.inputs", [], "'graphs.vision.inputs' = []"),
    ("graphs.vision.file", 7, "'graphs.vision.file' = 7"),
    ("pruning", {"method": "model_prior", "keep_ratio": 0}, "'pruning.keep_ratio' = 0"),
    ("visual_tokens", 0, "'visual_tokens' = 0"), ("answer", {}, "'answer.parser' is missing"),
    ("family", ["pcbvlm"], "'family' = ['pcbvlm']"),
    ("graph_groups", {"vision": ["vison"]}, "'graph_groups.vision[0]' = 'vison'"),
]


@pytest.mark.parametrize("path,value,fragment", BAD, ids=[f"{p}={v!r}" for p, v, _ in BAD])
def test_bad_field_is_a_bundle_error_naming_it(export, tmp_path, path, value, fragment):
    b = edited(export, tmp_path / "b", _set(path, value))
    with pytest.raises(BundleError) as e:
        read_manifest(b)
    assert fragment in str(e.value) and str(b) in str(e.value) and e.value.fix


def test_files_entries_are_strict(export, tmp_path):
    def bad_hash(m):
        m["files"]["vision.onnx"]["sha256"] = "XYZ"
    with pytest.raises(BundleError, match=r"'files\.vision\.onnx\.sha256' = 'XYZ'"):
        read_manifest(edited(export, tmp_path / "a", bad_hash))


@pytest.mark.parametrize("edit,fragment", [
    (_set("target.arch", ["x86_64"]), "'target.arch' = ['x86_64']"),
    (lambda m: m["target"].pop("arch"), "'target.arch' is missing"),
    (lambda m: m.pop("target"), "'target' is missing"),
    (_set("target", None), "'target' = None"),
    (_set("target.security", {"require_signature": "yes"}), "require_signature' = 'yes'"),
], ids=["arch-list", "arch-deleted", "target-deleted", "target-null", "security-not-bool"])
def test_a_built_bundle_must_name_its_arch(built, tmp_path, edit, fragment):
    b = edited(built, tmp_path / "b", edit)
    with pytest.raises(BundleError) as e:
        read_manifest(b)
    assert fragment in str(e.value)


def test_an_export_marked_int8_counts_as_built(export, tmp_path):
    b = edited(export, tmp_path / "b", _set("precision.vision", "int8"))
    with pytest.raises(BundleError, match="'target' is missing.*built for a target"):
        read_manifest(b)


@pytest.mark.parametrize("version,ok", [("0.1.9", True), ("0+source", True), ("0.1", True),
                                        ("0.2.0", False), ("99.0.0", False), ("1", False),
                                        ("banana", False), (3, False)])
def test_tools_pcbedge_newer_than_this_one_is_refused(export, tmp_path, version, ok):
    b = edited(export, tmp_path / "b", _set("tools.pcbedge", version))
    if ok:
        read_manifest(b)
        return
    with pytest.raises(BundleError) as e:
        read_manifest(b)
    msg = str(e.value)
    assert ("upgrade pcbedge" in msg) if isinstance(version, str) and version[0].isdigit() \
        else ("'tools.pcbedge'" in msg and "not a version" in msg)


def test_schema_version_too_old_or_new(export, tmp_path):
    with pytest.raises(BundleError, match="(?s)schema_version 0, older than version 1.*export"):
        read_manifest(edited(export, tmp_path / "a", _set("schema_version", 0)))
    with pytest.raises(BundleError, match="(?s)schema_version 2, newer.*upgrade pcbedge"):
        read_manifest(edited(export, tmp_path / "b", _set("schema_version", 2)))


# --- the family's own fields, when the bundle opens ---------------------------------------

def _region_offset() -> int:
    from pcbedge.data.qa import vocabulary_corpus
    from pcbedge.families.pcbvlm.tokenizer import build_tokenizer
    from pcbedge.families.pcbvlm.testing import TINY_NUM_REGIONS
    tok = build_tokenizer(vocabulary_corpus(), TINY_NUM_REGIONS)
    return tok.get_vocab(with_added_tokens=True)["<r_0>"]


OFF = _region_offset()   # the tiny model's first region pointer id

@pytest.mark.parametrize("edit,fragment", [
    (_set("answer.grammar", {}), "'answer.grammar.kind' is missing"),
    (_set("answer.grammar.eos", "4"), "'answer.grammar.eos' = '4'"),
    (_set("answer.grammar.intents", {"where": 5}), "'answer.grammar.intents.count' is missing"),
    (_set("answer.grammar.num_regions", 7), "the manifest's num_regions"),
    (_set("answer.grammar.eos", OFF + 4), f"below region_offset ({OFF})"),
    (_set("answer.grammar.region_offset", OFF - 10),
     f"'answer.grammar.region_offset' = {OFF - 10}"),
    (_set("answer.grammar.min_region_score", 2), "'answer.grammar.min_region_score' = 2"),
    (_set("answer.grammar.region_overlap_metric", "iomax"),
     "'answer.grammar.region_overlap_metric' = 'iomax'"),
    (_set("max_text_len", 49), "at least 51"),
], ids=["empty", "eos-str", "intents-partial", "regions", "eos-in-regions", "offset", "score",
        "overlap-metric", "no-room"])
def test_pcbvlm_fields_checked_before_anything_runs(export, tmp_path, edit, fragment):
    from pcbedge.runtime import load_runner
    b = edited(export, tmp_path / "b", edit)
    read_manifest(b)          # the core schema knows nothing of the grammar
    with pytest.raises(BundleError) as e:
        load_runner(b)
    assert fragment in str(e.value) and str(b) in str(e.value)


# --- graph inputs and outputs -------------------------------------------------------------

def test_step_graph_in_the_prefill_place_is_refused(export, tmp_path):
    from pcbedge.bundle.manifest import list_files
    from pcbedge.runtime import load_runner

    def swap(m):
        shutil.copyfile(tmp_path / "b" / "decoder_step.onnx",
                        tmp_path / "b" / "decoder_prefill.onnx")
        m["files"] = list_files(tmp_path / "b")
    b = edited(export, tmp_path / "b", swap)
    with pytest.raises(BundleError, match="decoder_prefill.onnx .* is not its 'decoder_prefill' "
                                          "graph: it has inputs"):
        load_runner(b)


def test_graph_io_types_and_ranks_are_compared():
    from pcbedge.runtime.sessions import check_graph_io
    t = SimpleNamespace
    graph = {"file": "g.onnx", "inputs": [{"name": "x", "dtype": "float32", "shape": [1, 3]}],
             "outputs": [{"name": "y", "dtype": "int64", "shape": None}]}
    ok = t(get_inputs=lambda: [t(name="x", type="tensor(float)", shape=[1, 3])],
           get_outputs=lambda: [t(name="y", type="tensor(int64)", shape=[5])])
    check_graph_io(Path("b"), "g", graph, ok)
    rank = t(get_inputs=lambda: [t(name="x", type="tensor(float)", shape=[3])],
             get_outputs=ok.get_outputs)
    with pytest.raises(BundleError, match="input 'x' of rank 1, not 2"):
        check_graph_io(Path("b"), "g", graph, rank)
    dtype = t(get_inputs=ok.get_inputs,
              get_outputs=lambda: [t(name="y", type="tensor(float)", shape=[5])])
    with pytest.raises(BundleError, match=r"output 'y' of type tensor\(float\), not "
                                          r"tensor\(int64\)"):
        check_graph_io(Path("b"), "g", graph, dtype)


# --- threads ------------------------------------------------------------------------------

def test_thread_bounds_follow_the_machine():
    from pcbedge.runtime.sessions import available_cpus, check_threads, max_threads
    cpus = available_cpus()
    assert max_threads() == min(256, 4 * cpus)
    assert check_threads(max_threads()) == max_threads() and check_threads(None) is None
    with pytest.raises(TargetError) as e:
        check_threads(max_threads() + 1)
    assert f"{cpus} CPU core(s)" in str(e.value) and f"--threads {cpus}" in e.value.fix
    with pytest.raises(TargetError, match="not a positive integer"):
        check_threads(0)


def test_bundle_threads_beyond_the_machine_are_clipped(export, tmp_path, caplog):
    from pcbedge.runtime import load_runner
    from pcbedge.runtime.sessions import available_cpus
    b = edited(export, tmp_path / "b", _set("runtime.threads", 256))
    with caplog.at_level(logging.WARNING, logger="pcbedge.runtime.sessions"):
        r = load_runner(b)
    assert r.threads == available_cpus() < 256
    assert "runtime.threads = 256" in caplog.text
    assert load_runner(b, threads=1).threads == 1


@pytest.mark.parametrize("verb", ["ask", "bench"])
def test_cli_threads_1000_fails_fast(export, tmp_path, verb):
    from pcbedge.cli import cli
    test, temp = write_pair_images(tmp_path)
    argv = (["ask", str(export), "--image", str(test), "--template", str(temp), "where?"]
            if verb == "ask" else ["bench", str(export), "--out", str(tmp_path / "out")])
    t0 = time.perf_counter()
    result = CliRunner().invoke(cli, [*argv, "--threads", "1000"])
    assert time.perf_counter() - t0 < 10
    assert result.exit_code == TargetError.exit_code and "threads=1000" in result.output
    assert not (tmp_path / "out").exists()


# --- the architecture check's fix ---------------------------------------------------------

def test_arch_fix_names_shipped_targets_of_this_machine(built, monkeypatch):
    import platform

    from pcbedge.runtime.sessions import check_arch
    from pcbedge.runtime.vocabulary import normalize_arch
    from pcbedge.targets import list_targets
    m = read_manifest(built)
    have = normalize_arch(platform.machine())
    m["target"]["arch"] = "aarch64" if have == "x86_64" else "x86_64"
    names = [t.name for t in list_targets() if normalize_arch(t.arch) == have]
    with pytest.raises(HardwareMismatchError) as e:
        check_arch(built, m)
    assert "<a " not in e.value.fix
    assert all(f"--target {n}" in e.value.fix for n in names) and names
    monkeypatch.setattr(platform, "machine", lambda: "riscv64")
    m["target"]["arch"] = "x86_64"
    with pytest.raises(HardwareMismatchError, match="no shipped target is for riscv64"):
        check_arch(built, m)


def test_write_and_read_round_trip_still_accepts_a_valid_manifest(export, tmp_path):
    out = tmp_path / "again"
    out.mkdir()
    m = read_manifest(export)
    write_manifest(out, m)
    assert read_manifest(out) == m


def test_validation_stays_lean():
    """The device reads and validates manifests without numpy, onnxruntime or cryptography."""
    code = ("import sys, pcbedge.bundle.manifest, pcbedge.bundle.schema, pcbedge.bundle.signing;"
            "print([m for m in ('numpy', 'onnxruntime', 'cryptography', 'torch') "
            "if m in sys.modules])")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         cwd=REPO, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stderr
