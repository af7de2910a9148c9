"""Runtime words a target profile may use, defined once below the profiles (torch- and
onnxruntime-free): when intra-op threads spin-wait, and the names of CPU architectures."""
from __future__ import annotations

# when onnxruntime's intra-op threads spin-wait (pcbedge.runtime.sessions.SPIN_WAIT)
SPIN_WAITS = ("during_run", "always", "never")
DEFAULT_SPIN_WAIT = "during_run"
ARCHS = ("x86_64", "aarch64")
# what platform.machine() and vendors call the same architecture
ARCH_ALIASES = {"amd64": "x86_64", "x64": "x86_64", "arm64": "aarch64", "armv8": "aarch64"}


def normalize_arch(arch: str) -> str:
    """One name per architecture ("amd64" -> "x86_64", "arm64" -> "aarch64")."""
    a = str(arch).lower()
    return ARCH_ALIASES.get(a, a)
