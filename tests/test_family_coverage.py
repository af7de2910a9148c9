"""Registry coverage: every registered family goes through every verb, and every build target,
in a test; adding a family touches its folder and one registry line (shown with a toy family
that lives in tests/toyfamily/ and is registered with one line)."""
from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

from pcbedge import api
from pcbedge.errors import ModelError
from pcbedge.families import (detect_family, get_family, register_family,
                              registered_families, unregister_family)
from pcbedge.families.base import Family
from pcbedge.targets import shipped_names

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
VERBS = ("export", "build", "bench", "ask", "ask_model", "plan")
OPEN_GATES = {"p95_ms_max": 1e9, "max_map_drop": 1.0, "max_count_drop": 1.0,
              "max_hallucination_rise": 1e9, "min_map": 0.0}
ALL_TARGETS = "*"
# what each role module of a family provides (pcbedge.families.base)
ROLES = {"export": ("load_model", "default_input_size", "graphs", "reference", "manifest_extras"),
         "parity": ("check_parity",), "runner": ("open_runner",),
         "torch_runner": ("open_runner",),
         "recipe": ("apply_shapes", "calibration_feeds", "trt_axis_ranges"),
         "plan": ("plan_calls",), "testing": ("tiny_model",)}
CORE = ("bundle", "export", "recipes", "runtime", "benchmarks", "targets", "calibration", "data",
        "plan")   # a covers() marker whose test runs every shipped target


def declared_coverage() -> set[tuple[str, str, str]]:
    """(family, verb, target) of every ``@pytest.mark.covers(family, verb[, target])`` in the
    test files; target ``*`` stands for each shipped target, "" for none."""
    out = set()
    for path in TESTS.glob("test_*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and node.func.attr == "covers"):
                args = [ast.literal_eval(a) for a in node.args]
                fams = args[0] if isinstance(args[0], (list, tuple)) else [args[0]]
                target = args[2] if len(args) > 2 else ""
                targets = shipped_names() if target == ALL_TARGETS else [target]
                out |= {(f, args[1], t) for f in fams for t in targets}
    return out


@pytest.mark.parametrize("family", registered_families())
def test_every_family_is_tested_through_every_verb(family):
    cov = declared_coverage()
    missing = [v for v in VERBS if not any(f == family and vb == v for f, vb, _ in cov)]
    assert not missing, f"family {family} has no covers({family!r}, verb) test for {missing}"
    untested = [t for t in shipped_names() if (family, "build", t) not in cov]
    assert not untested, f"family {family}: no build test for targets {untested}"


@pytest.mark.parametrize("name", registered_families())
def test_family_provides_every_role(name):
    fam = get_family(name)
    assert isinstance(fam, Family) and fam.name == name
    assert fam.model_files and fam.weights_file in fam.model_files
    assert fam.graph_roles and set(fam.graph_groups) <= {"vision", "decoder"}
    assert {r for roles in fam.graph_groups.values() for r in roles} <= set(fam.graph_roles)
    for role, functions in ROLES.items():
        mod = fam.module(role)
        missing = [f for f in functions if not callable(getattr(mod, f, None))]
        assert not missing, f"{name}: {mod.__name__} lacks {missing}"


def test_core_never_names_a_family():
    """No core module, nor the API and CLI, imports a family folder or names a family (the
    registry's one line per family and its DEFAULT_FAMILY are the only places; each family's
    test models are in its own folder)."""
    core = [p for pkg in CORE for p in (REPO / "pcbedge" / pkg).rglob("*.py")]
    core += [REPO / "pcbedge" / f for f in ("geometry.py", "errors.py", "checkpoint.py", "api.py",
                                             "cli.py", "testing.py")]
    offenders = []
    for p in core:
        for node in ast.walk(ast.parse(p.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                mods = [node.module or ""] if isinstance(node, ast.ImportFrom) else \
                    [a.name for a in node.names]
                if any(m.startswith("pcbedge.families.") for m in mods):
                    offenders.append(f"{p.relative_to(REPO)} imports {mods}")
            elif isinstance(node, ast.Constant) and isinstance(node.value, str):
                if any(n in node.value.lower() for n in ("qwen", "pcbvlm")) and \
                        "pcbvlm/reference" not in node.value.replace("\\", "/") \
                        and "families/pcbvlm" not in node.value:
                    offenders.append(f"{p.relative_to(REPO)} names {node.value[:60]!r}")
    assert not offenders, offenders


def test_unknown_family_lists_registered():
    with pytest.raises(ModelError, match="(?s)unknown model family 'nope'.*pcbvlm"):
        get_family("nope")


def test_detect_family(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "pcbvlm"}))
    assert detect_family(tmp_path).name == "pcbvlm"
    (tmp_path / "config.json").write_text("[1, 2")
    with pytest.raises(ModelError, match="cannot read"):
        detect_family(tmp_path)
    (tmp_path / "config.json").unlink()
    (tmp_path / "model.pth").write_bytes(b"\x80")
    with pytest.raises(ModelError, match="pickle"):
        detect_family(tmp_path)


# -- a family defined in the tests: its folder + one registry line -------------------------

@pytest.fixture()
def toy_family():
    sys.path.insert(0, str(TESTS / "toyfamily"))
    register_family("toyvlm", "toyvlm:ToyFamily")          # the one registry line
    try:
        yield get_family("toyvlm")
    finally:
        unregister_family("toyvlm")
        sys.path.remove(str(TESTS / "toyfamily"))


@pytest.fixture()
def toy_export(toy_family, tmp_path):
    from toyvlm import make_checkpoint
    ckpt = make_checkpoint(tmp_path / "toy-ckpt")
    return ckpt, api.export_model(ckpt, tmp_path / "toy-export", progress=False)


@pytest.mark.covers("toyvlm", "export")
@pytest.mark.covers("toyvlm", "build", "*")
@pytest.mark.covers("toyvlm", "bench")
@pytest.mark.covers("toyvlm", "ask")
@pytest.mark.covers("toyvlm", "ask_model")
@pytest.mark.covers("toyvlm", "plan")
def test_a_new_family_goes_through_every_verb(toy_export, tmp_path, sample_data):
    ckpt, export = toy_export
    m = json.loads((export / "manifest.json").read_text())
    assert m["family"] == "toyvlm" and m["graph_groups"] == {"vision": ["vision"],
                                                             "decoder": ["decoder"]}
    for target in shipped_names():
        out = api.build_bundle(target, export, tmp_path / target, progress=False)
        b = json.loads((out / "manifest.json").read_text())
        assert b["precision"] == m["precision"] | b["precision"] and b["target"]["name"] == target
        if b["runtime"].get("providers") == ["CPUExecutionProvider"] and b["target"]["arch"] == "x86_64":
            board = sample_data / "group00041" / "00041"
            ans = api.load_runner(out).ask(board / "00041011_test.jpg",
                                           board / "00041011_temp.jpg", "where are the defects?")
            assert {"answer", "count", "defects", "latency_ms"} <= set(ans)
    x86 = json.loads((tmp_path / "x86-cpu" / "manifest.json").read_text())
    assert x86["quantization"]["graphs"]["vision"]["placement"]["quantized_nodes"]
    report = api.run_benchmark(tmp_path / "x86-cpu", out_dir=tmp_path / "bench", gates=OPEN_GATES,
                               queries=3, min_seconds=0.0, warmup=0, max_boards=2,
                               progress=False)
    assert report["passed"] and report["drift"]["available"]
    plan = api.plan(tmp_path / "x86-cpu")
    assert plan["family"] == "toyvlm" and plan["stages"]["vision"]["macs_total"] > 0
    assert report["plan"]["available"] and "answer" in report["plan"]["stages"]
    board = sample_data / "group00041" / "00041"
    ref = api.load_runner(ckpt).ask(board / "00041011_test.jpg", board / "00041011_temp.jpg",
                                    "how many defects are there")
    got = api.load_runner(export).ask(board / "00041011_test.jpg", board / "00041011_temp.jpg",
                                      "how many defects are there")
    assert ref["defects"] == got["defects"] and ref["intent"] == got["intent"]


def test_adding_the_toy_family_touched_no_core_file():
    """The toy family is its folder; nothing under pcbedge/ names it."""
    hits = subprocess.run(["grep", "-rl", "toyvlm", str(REPO / "pcbedge")], capture_output=True,
                          text=True).stdout.split()
    assert hits == []


def test_the_default_family_ships_the_default_model_and_trains_it(monkeypatch, tmp_path):
    """The API's default model and `finetune` come from the registry's DEFAULT_FAMILY."""
    from pcbedge import api
    from pcbedge.families import DEFAULT_FAMILY, default_model
    fam = get_family(DEFAULT_FAMILY)
    assert api.DEFAULT_MODEL == default_model() == fam.reference_model
    fam.check_model_dir(fam.reference_model)             # a complete model folder
    seen = {}
    monkeypatch.setattr(fam.module("train"), "finetune",
                        lambda d, o, **kw: seen.update(data=d, out=o, **kw) or "trained")
    assert api.finetune("data", tmp_path, seed=3) == "trained"
    assert seen == {"data": "data", "out": tmp_path, "seed": 3}
