"""Where a bench ran: hardware, library versions, the bundle and the runner's settings.

Only the standard library, psutil and ``nvidia-smi`` (when present): nothing here imports a
runtime, so collecting the environment never changes what is measured.
"""
from __future__ import annotations

import hashlib
import os
import platform
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

from pcbedge.runtime.int8_kernels import saturation_warning, x86_has_vnni
from pcbedge.runtime.vocabulary import normalize_arch

PACKAGES = ("pcbedge", "onnxruntime", "onnxruntime-gpu", "numpy", "pillow", "tokenizers",
            "torch", "tensorrt")


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            # x86 says "model name"; many arm64 kernels only say "Hardware" or nothing.
            if line.lower().startswith(("model name", "hardware", "cpu model")):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _device_model() -> str | None:
    """Board name on ARM devices (e.g. a Jetson), from the device tree."""
    try:
        return Path("/proc/device-tree/model").read_bytes().rstrip(b"\0").decode() or None
    except (OSError, UnicodeDecodeError):
        return None


def _gpu() -> str | None:
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    try:
        out = subprocess.run([exe, "--query-gpu=name,driver_version,memory.total",
                              "--format=csv,noheader"], capture_output=True, text=True,
                             timeout=10, check=False).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return "; ".join(line.strip() for line in out.splitlines() if line.strip()) or None


def _version(pkg: str) -> str | None:
    try:
        return metadata.version(pkg)
    except metadata.PackageNotFoundError:
        if pkg == "pcbedge":  # a source checkout on PYTHONPATH is not an installed dist
            from pcbedge import __version__
            return __version__
        return None


def manifest_sha256(path: str | Path) -> str | None:
    """sha256 of ``path/manifest.json`` (a bundle), None for a folder without one."""
    f = Path(path) / "manifest.json"
    return hashlib.sha256(f.read_bytes()).hexdigest() if f.is_file() else None


def _block(manifest: dict, key: str):
    v = manifest.get(key)
    if isinstance(v, dict):
        return ", ".join(f"{k}={v[k]}" for k in sorted(v) if not isinstance(v[k], (dict, list)))
    return v


def collect_environment(bundle: str | Path, runner=None, threads: int | None = None) -> dict:
    """A flat dict (the HTML report lists scalars) describing machine, software and bundle."""
    import psutil

    manifest = (getattr(runner, "manifest", None) or {}) if runner is not None else {}
    providers = getattr(runner, "providers", None)
    env = {
        "cpu_model": _cpu_model(),
        "cpu_cores_logical": os.cpu_count(),
        "cpu_cores_physical": psutil.cpu_count(logical=False),
        "arch": platform.machine(),
        "os": f"{platform.system()} {platform.release()}",
        "device_model": _device_model(),
        "gpu": _gpu(),
        "memory_total_mb": round(psutil.virtual_memory().total / 2 ** 20),
        "python": sys.version.split()[0],
        **{f"{p.replace('-', '_')}_version": _version(p) for p in PACKAGES},
        "runner": type(runner).__name__ if runner is not None else None,
        "providers": ", ".join(providers) if isinstance(providers, (list, tuple)) else providers,
        "bundle": str(Path(bundle).resolve()),
        "manifest_sha256": manifest_sha256(bundle),
        "precision": _block(manifest, "precision"),
        "pruning": _block(manifest, "pruning"),
        "target": (manifest.get("target") or {}).get("name")
        if isinstance(manifest.get("target"), dict) else manifest.get("target"),
        "threads": threads if threads is not None else getattr(runner, "threads", None),
        # x86 without VNNI clips u8 x s8 sums of 8-bit weights (pcbedge.runtime.int8_kernels)
        "x86_vnni": x86_has_vnni() if normalize_arch(platform.machine()) == "x86_64" else None,
        "int8_saturation": saturation_warning(manifest) if manifest else None,
    }
    return env
