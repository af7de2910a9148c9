"""Target profiles: every shipped profile loads; every bad field is refused by name."""
from __future__ import annotations

import json
import re

import pytest
from click.testing import CliRunner

from pcbedge.cli import cli
from pcbedge.errors import TargetError
from pcbedge.targets import TARGETS_DIR, TargetProfile, list_targets, load_target, shipped_names

# What each shipped profile must be. A new profile without an entry here fails
# test_every_shipped_profile_has_expectations (the registry coverage test).
EXPECTED = {
    "x86-cpu": {"runtime": "onnxruntime", "arch": "x86_64", "threads": 2,
                "precision": ("int8", "fp32"), "budget": 300.0},
    "arm64-cpu": {"runtime": "onnxruntime", "arch": "aarch64", "threads": 4,
                  "precision": ("int8", "fp32"), "budget": 600.0},
    "x86-cuda": {"runtime": "onnxruntime", "arch": "x86_64", "threads": None,
                 "precision": ("fp32", "fp32"), "budget": 200.0},
    "jetson-orin": {"runtime": "tensorrt", "arch": "aarch64", "threads": None,
                    "precision": ("int8", "fp16"), "budget": 500.0},
    # the Orin modules: jetson-orin's recipe (extends) with their [hardware] for pcbedge plan
    **{name: {"runtime": "tensorrt", "arch": "aarch64", "threads": None,
              "precision": ("int8", "fp16"), "budget": 500.0}
       for name in ("orin-nano-8gb", "orin-nx-16gb", "agx-orin-64gb")},
}


def test_every_shipped_profile_has_expectations():
    assert set(shipped_names()) == set(EXPECTED)
    assert [t.name for t in list_targets()] == shipped_names()


@pytest.mark.parametrize("name", [t.name for t in list_targets()])
def test_shipped_profile_loads_and_validates(name):
    profile = load_target(name)
    want = EXPECTED[name]
    assert isinstance(profile, TargetProfile)
    assert profile.name == name
    assert (profile.runtime, profile.arch, profile.threads) == \
        (want["runtime"], want["arch"], want["threads"])
    assert (profile.precision.vision, profile.precision.decoder) == want["precision"]
    assert profile.latency_budget_ms == want["budget"]
    assert profile.gates.p95_ms_max == profile.latency_budget_ms
    assert (profile.gates.max_map_drop, profile.gates.max_count_drop,
            profile.gates.max_hallucination_rise, profile.gates.min_map) == (0.01, 0.01, 0.0, 0.90)
    assert (profile.tensorrt is not None) == (profile.runtime == "tensorrt")
    json.dumps(profile.as_dict())  # manifests embed it
    with pytest.raises(AttributeError):
        profile.name = "other"  # frozen


def test_jetson_orin_uses_tensorrt_10_3():
    trt = load_target("jetson-orin").tensorrt
    assert (trt.version, trt.workspace_mb) == ("10.3", 2048)


def test_load_by_path_and_gate_defaults(tmp_path):
    text = _shipped_text()
    text = text[:text.index("[gates]")]  # [gates] is optional
    path = tmp_path / "x86-cpu.toml"
    path.write_text(text)
    profile = load_target(str(path))
    assert profile.source == str(path)
    assert profile.gates.p95_ms_max == profile.latency_budget_ms == 300.0
    assert profile.gates.min_map == 0.90
    assert load_target(path) == profile
    assert load_target(profile) is profile


def test_unknown_target_name_lists_the_shipped_names():
    with pytest.raises(TargetError) as exc:
        load_target("orin-nano-super")
    for name in shipped_names():
        assert name in str(exc.value)
    assert exc.value.exit_code == 14


def test_missing_profile_file():
    with pytest.raises(TargetError, match="not found"):
        load_target("profiles/none.toml")


def _shipped_text() -> str:
    return (TARGETS_DIR / "x86-cpu.toml").read_text()


def _edit(text: str, section: str, key: str, value: str | None) -> str:
    """Set (or with value None, delete) ``key`` in ``[section]`` ("" = top level)."""
    start = 0 if not section else text.index(f"\n[{section}]\n")
    end = text.find("\n[", start + 1)
    end = len(text) if end < 0 else end
    body, n = re.subn(rf"(?m)^{key} = .*$", "" if value is None else f"{key} = {value}",
                      text[start:end], count=1)
    if n == 0:  # a new key: add it at the top of the section
        head = body.index("\n", 1) + 1 if section else 0
        body = body[:head] + f"{key} = {value}\n" + body[head:]
    return text[:start] + body + text[end:]


# (section, key, new TOML value or None to delete, words the message must hold)
BAD_FIELDS = [
    ("precision", "vision", '"int3"', ["precision.vision", "'int3'", "'fp32', 'fp16', 'int8', 'int4'"]),
    ("precision", "vision", '"int4"', ["precision.vision", "'int4' only for the decoder"]),
    ("", "runtime", '"tflite"', ["runtime", "'tflite'", "'onnxruntime', 'tensorrt'"]),
    ("", "arch", '"riscv64"', ["arch", "'riscv64'", "'x86_64', 'aarch64'"]),
    ("", "threads", "0", ["threads", "= 0", "integer >= 1"]),
    ("", "threads", '"2"', ["threads", "'2'", "integer"]),
    ("", "threads", "true", ["threads", "True", "integer"]),
    ("", "latency_budget_ms", "-5", ["latency_budget_ms", "-5", "> 0"]),
    ("", "spin_wait", '"sometimes"', ["spin_wait", "'sometimes'", "'during_run'"]),
    ("", "providers", '["CUDAExecutionProvider"]', ["providers", "CPUExecutionProvider"]),
    ("", "providers", '["NPUProvider", "CPUExecutionProvider"]', ["providers", "'NPUProvider'"]),
    ("", "colour", '"red"', ["unknown key 'colour'", "latency_budget_ms"]),
    ("", "description", None, ["missing field 'description'"]),
    ("precision", "decoder", '"fp16"', ["precision.decoder", "'fp16'", "CPU provider"]),
    ("precision", "decoder", '"int8"', ["quantization.decoder_ops", "non-empty"]),
    ("quantization", "scheme", '"dynamic"', ["quantization.scheme", "'dynamic'", "'qdq_static'"]),
    ("quantization", "vision_ops", '["Conv", "FancyConv"]',
     ["quantization.vision_ops", "FancyConv"]),
    ("quantization", "decoder_ops", '["MatMul"]', ["quantization.decoder_ops", "'fp32'"]),
    ("quantization", "per_channel", '"yes"',
     ["quantization.per_channel", "'yes'", "true or false"]),
    ("quantization", "weight_type", '"int4"', ["quantization.weight_type", "'int4'", "'uint8'"]),
    ("quantization", "reduce_range", '"yes"',
     ["quantization.reduce_range", "'yes'", "true or false"]),
    ("quantization", "calibration_method", '"kl"', ["calibration_method", "'kl'", "'entropy'"]),
    ("quantization", "calibration_boards", "0", ["calibration_boards", "= 0"]),
    ("quantization", "score_bias_boards", "-1", ["score_bias_boards", "integer >= 0"]),
    ("pruning", "method", '"random"', ["pruning.method", "'random'", "'model_prior'"]),
    ("pruning", "keep_ratio", "1.5", ["pruning.keep_ratio", "1.5", "<= 1.0"]),
    ("pruning", "keep", "0.5", ["unknown key 'pruning.keep'", "keep_ratio"]),
    ("shapes", "input_size", "20", ["shapes.input_size", "20", ">= 28"]),
    ("gates", "min_map", "1.5", ["gates.min_map", "1.5"]),
    ("gates", "p95_ms", "100", ["unknown key 'gates.p95_ms'", "p95_ms_max"]),
]


@pytest.mark.parametrize("section, key, value, words", BAD_FIELDS,
                         ids=[f"{s or 'top'}.{k}={v}" for s, k, v, _ in BAD_FIELDS])
def test_bad_field_is_refused_naming_file_and_field(tmp_path, section, key, value, words):
    path = tmp_path / "x86-cpu.toml"
    path.write_text(_edit(_shipped_text(), section, key, value))
    with pytest.raises(TargetError) as exc:
        load_target(path)
    message = str(exc.value)
    assert str(path) in message
    for word in words:
        assert word in message, message


@pytest.mark.parametrize("mutate, words", [
    (lambda t: t.replace("[shapes]", "[shape]"), ["unknown key 'shape'"]),
    (lambda t: t[:t.index("[pruning]")] + t[t.index("[shapes]"):], ["missing section [pruning]"]),
    (lambda t: t + '\n[tensorrt]\nversion = "10.3"\nworkspace_mb = 2048\n', ["[tensorrt]"]),
    (lambda t: t.replace('name = "x86-cpu"', 'name = "x86-cpu'), ["not valid TOML"]),
    (lambda t: 'precision = "int8"\n' + t[:t.index("[precision]")] + t[t.index("[quantization]"):],
     ["'precision' = 'int8'", "a [precision] table"]),
], ids=["misspelt-section", "missing-section", "tensorrt-on-ort", "bad-toml", "scalar-section"])
def test_bad_structure_is_refused(tmp_path, mutate, words):
    path = tmp_path / "x86-cpu.toml"
    path.write_text(mutate(_shipped_text()))
    with pytest.raises(TargetError) as exc:
        load_target(path)
    assert str(path) in str(exc.value)
    for word in words:
        assert word in str(exc.value)


def test_score_bias_only_for_an_int8_vision_graph_on_onnxruntime(tmp_path):
    path = tmp_path / "x86-cuda.toml"
    text = (TARGETS_DIR / "x86-cuda.toml").read_text()
    path.write_text(_edit(text, "quantization", "score_bias_boards", "8"))
    with pytest.raises(TargetError, match="score_bias_boards.*0 unless the vision graph is int8"):
        load_target(path)


def test_reduce_range_only_on_onnxruntime(tmp_path):
    path = tmp_path / "jetson-orin.toml"
    text = (TARGETS_DIR / "jetson-orin.toml").read_text()
    path.write_text(_edit(text, "quantization", "reduce_range", "true"))
    with pytest.raises(TargetError, match="quantization.reduce_range.*false for TensorRT"):
        load_target(path)


def test_uint8_weights_only_on_onnxruntime(tmp_path):
    path = tmp_path / "jetson-orin.toml"
    text = (TARGETS_DIR / "jetson-orin.toml").read_text()
    path.write_text(_edit(text, "quantization", "weight_type", '"uint8"'))
    with pytest.raises(TargetError, match="quantization.weight_type.*'int8' for TensorRT"):
        load_target(path)


def test_name_must_match_the_file_name(tmp_path):
    path = tmp_path / "my-box.toml"
    path.write_text(_shipped_text())
    with pytest.raises(TargetError, match="'name' = 'x86-cpu'.*'my-box'"):
        load_target(path)


def test_tensorrt_runtime_needs_its_section(tmp_path):
    text = (TARGETS_DIR / "jetson-orin.toml").read_text()
    path = tmp_path / "jetson-orin.toml"
    path.write_text(text[:text.index("[tensorrt]")] + text[text.index("[gates]"):])
    with pytest.raises(TargetError, match=r"needs a \[tensorrt\] section"):
        load_target(path)


def test_cli_targets_lists_all_four():
    result = CliRunner().invoke(cli, ["targets"])
    assert result.exit_code == 0
    for name in EXPECTED:
        assert name in result.output
    assert "tensorrt" in result.output and "int8/fp16" in result.output
