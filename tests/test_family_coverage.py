"""Every registered export family has its own export test; the registry fails loudly."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from pcbedge.errors import ModelError
from pcbedge.export.families import VlmFamily, detect_family, get_family, registered_families

TESTS = Path(__file__).resolve().parent


def test_every_family_has_an_export_test():
    families = registered_families()
    assert "pcbvlm" in families
    untested = [f for f in families if not (TESTS / f"test_export_{f}.py").is_file()]
    assert not untested, (f"registered families without tests/test_export_<family>.py: "
                          f"{untested}")


@pytest.mark.parametrize("name", registered_families())
def test_family_adapter_is_complete(name):
    fam = get_family(name)
    assert isinstance(fam, VlmFamily) and fam.name == name
    assert fam.model_files and fam.weights_file in fam.model_files
    for method in ("load_model", "graphs", "reference", "reference_answer",
                   "default_input_size", "manifest_extras"):
        assert getattr(type(fam), method) is not getattr(VlmFamily, method), method


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
