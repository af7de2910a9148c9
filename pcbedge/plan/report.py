"""The plan as a table on the terminal, and as a JSON file (``pcbedge plan --json``)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

from pcbedge.errors import OutputError

KIND = "pcbedge plan"


def _g(x: float) -> str:
    for unit, div in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= div:
            return f"{x / div:.2f}{unit}"
    return f"{x:.0f}"


def print_plan(plan: dict, echo: Callable[[str], None] = print) -> None:
    hw = plan["hardware"]
    echo(f"pcbedge plan  {plan['bundle']} ({plan['family']}) on {plan['target']}: {hw['device']}")
    echo(f"  hardware: {', '.join(f'{k} {v:g} TOPS' for k, v in hw['peak_tops'].items())}, "
         f"{hw['memory_bandwidth_gbs']:g} GB/s, {hw['memory_gb']:g} GB "
         f"(efficiency compute {hw['efficiency_compute']:g}"
         + "".join(f", {k} {v:g}" for k, v in
                   (hw.get("efficiency_compute_by_precision") or {}).items())
         + f", memory {hw['efficiency_memory']:g}, "
         f"{hw['node_overhead_us']:g} us/node)")
    echo(f"  source: {hw['source']}")
    echo(f"  calibration: {hw['calibration']}")
    t = plan["typical_answer"]
    echo("  typical answer: " + ", ".join(f"{k} {v:g}" if isinstance(v, (int, float)) else
                                          f"{k} {v}" for k, v in t.items() if k != "source"))
    echo(f"  {'stage':<11}{'MACs':>10}{'bytes':>10}{'floor ms':>10}{'predicted':>11}  bound")
    for name, st in plan["stages"].items():
        bounds = sorted({c["bound"] for c in st["calls"]}) or ["host"]
        echo(f"  {name:<11}{_g(st.get('macs_total', 0)):>10}{_g(st['bytes']):>10}"
             f"{st['floor_ms']:>10.2f}{st['predicted_ms']:>11.2f}  {'/'.join(bounds)}")
    per_tok = plan.get("decode_ms_per_token")
    if per_tok:
        echo(f"  decode per token: {per_tok:.2f} ms ({1e3 / per_tok:.1f} tok/s)")
    m = plan["memory"]
    echo(f"  memory: weights {m['weights_mb']:.0f} MB + KV {m['kv_cache_mb']:.1f} MB + largest "
         f"node {m['largest_node_mb']:.0f} MB + runtime {m['runtime_mb']:.0f} MB = "
         f"{m['peak_mb']:.0f} MB of {m['available_mb']:.0f} MB available: "
         f"{'fits' if m['fits'] else 'DOES NOT FIT'}")
    verdict = "meets" if plan["meets_budget"] else "MISSES"
    echo(f"  predicted P50 {plan['predicted_p50_ms']:.1f} ms: {verdict} the "
         f"{plan['budget_ms']:g} ms budget")


def write_plan_json(path: str | Path, plan: dict, inputs: dict) -> None:
    """Write ``plan`` atomically; an existing file is replaced only when it is a plan pcbedge
    wrote, and never one of ``inputs``."""
    from pcbedge.bundle.atomic import atomic_write_json
    from pcbedge.bundle.outputs import check_outside_inputs
    path = Path(path)
    check_outside_inputs(path, inputs)
    if path.exists():
        try:
            doc = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None
        except (OSError, UnicodeDecodeError, ValueError):
            doc = None
        if not (isinstance(doc, dict) and doc.get("kind") == KIND):
            raise OutputError(f"{path} exists and is not a plan pcbedge wrote: it is never "
                              "replaced", fix="choose a new file name for --json")
    atomic_write_json(path, {"kind": KIND, **plan})
