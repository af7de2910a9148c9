"""Deployment targets: the shipped profiles (``<name>.toml`` beside this file) and user profiles.

>>> from pcbedge.targets import load_target, list_targets
>>> load_target("x86-cpu").precision.vision
'int8'
"""
from __future__ import annotations

from pathlib import Path

from pcbedge.errors import TargetError
from pcbedge.runtime.pruning import TokenPruningConfig
from pcbedge.targets.files import load_profile
from pcbedge.targets.profile import (GateConfig, PrecisionConfig, QuantizationSettings,
                                     ShapeConfig, TargetProfile,
                                     TensorRTConfig, parse_profile)

TARGETS_DIR = Path(__file__).resolve().parent

__all__ = ["GateConfig", "PrecisionConfig", "QuantizationSettings", "ShapeConfig",
           "TokenPruningConfig",
           "TargetProfile", "TensorRTConfig", "list_targets", "load_target", "parse_profile",
           "shipped_names"]


def shipped_names() -> list[str]:
    """Names of the profiles shipped with pcbedge, sorted."""
    return sorted(p.stem for p in TARGETS_DIR.glob("*.toml"))


def load_target(name_or_path: str | Path | TargetProfile) -> TargetProfile:
    """A shipped target by name (``"x86-cpu"``), or a profile file by path (``"my.toml"``)."""
    if isinstance(name_or_path, TargetProfile):
        return name_or_path
    text = str(name_or_path)
    if isinstance(name_or_path, Path) or text.endswith(".toml") or "/" in text or "\\" in text:
        return load_profile(Path(name_or_path))
    if text not in shipped_names():
        raise TargetError(f"unknown target {text!r}; shipped targets: {', '.join(shipped_names())}",
                          fix="pass one of these names, or the path of your own .toml profile "
                              "(see docs/targets.md)")
    return load_profile(TARGETS_DIR / f"{text}.toml")


def list_targets() -> list[TargetProfile]:
    """Every shipped profile, loaded and validated, sorted by name."""
    return [load_profile(TARGETS_DIR / f"{n}.toml") for n in shipped_names()]
