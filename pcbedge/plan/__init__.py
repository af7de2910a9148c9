"""``pcbedge plan``: what a bundle costs on a target before anyone buys the device.

For a typical answer of the bundle's family (the family's ``plan`` module lists the graph calls
of one answer and their input sizes: docs/plan.md), per stage (preprocess, vision, prefill,
decode): the compute (MACs by precision, read from the graphs at those sizes, attention
included), the bytes moved (weights, inputs and outputs such as the KV cache, intermediate
tensors), the roofline floor on the target's peak figures, and the predicted latency with the
target's calibrated efficiency factors; then the predicted P50 of the answer against the
target's budget, and the peak memory against the device's. Reads graphs and the manifest, never
the weights' data. Torch-free.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pcbedge.errors import BundleError, PcbEdgeError, TargetError

STAGES = ("preprocess", "vision", "prefill", "decode")


@dataclass(frozen=True)
class Call:
    """``count`` runs of graph ``graph`` with its named axes set to ``dims`` (one answer)."""

    stage: str
    graph: str
    dims: dict
    count: float = 1.0
    what: str = ""


def _target_of(manifest: dict, target):
    from pcbedge.targets import load_target
    if target is None:
        name = (manifest.get("target") or {}).get("name")
        if not name:
            raise TargetError("this bundle was built for no target, so plan needs one",
                              fix="pass --target NAME (pcbedge targets lists them)")
        target = name
        source = (manifest.get("build") or {}).get("profile_source")
        if source and Path(source).suffix == ".toml" and Path(source).is_file():
            target = source          # a profile file of the user's own, not a shipped name
    profile = load_target(target)
    if profile.hardware is None:
        from pcbedge.targets import list_targets
        ready = [t.name for t in list_targets() if t.hardware is not None]
        raise TargetError(f"target {profile.name!r} has no [hardware] section, so its latency "
                          "cannot be predicted", fix=f"pass --target with one of {', '.join(ready)}"
                                                     f", or add [hardware] to {profile.source} "
                                                     "(docs/plan.md)")
    return profile


def compute_s(floors: dict, hw) -> float:
    """The achieved compute time of one graph call: each MAC key's floor {key: s} over its
    efficiency (hw.efficiency: efficiency_compute, or the precision's own)."""
    return sum(t / hw.efficiency(k) for k, t in floors.items())


def latency_s(compute: float, memory_s: float, nodes: int, on_chip_s: float, *,
              efficiency_memory: float, node_overhead_us: float) -> float:
    """The latency model of one graph call (docs/plan.md), from its achieved compute time
    (:func:`compute_s`) and its memory floor."""
    return (max(compute, memory_s / efficiency_memory)
            + nodes * node_overhead_us * 1e-6 + on_chip_s)


def _call_ms(cost, hw) -> dict:
    used, by_key = {}, {}
    for precision, macs in cost.macs.items():
        rate, peak_of = hw.rate(precision)
        by_key[precision] = macs / rate
        used[precision] = peak_of
    floor_s, achieved_s = sum(by_key.values()), compute_s(by_key, hw)
    moved = cost.dram_bytes(hw.cache_mb * 2 ** 20)
    memory_s = moved / (hw.memory_bandwidth_gbs * 1e9)
    # element-wise work on tensors that live in the cache (softmax, norms, activations): its
    # own term on a CPU, where each such op is a pass over its tensors; 0 on a GPU profile
    # whose engine fuses them (cache_bandwidth_gbs unset)
    on_chip_s = (cost.cached_activation_bytes(hw.cache_mb * 2 ** 20)
                 / (hw.cache_bandwidth_gbs * 1e9)) if hw.cache_bandwidth_gbs else 0.0
    overhead_s = cost.nodes * hw.node_overhead_us * 1e-6 + on_chip_s
    total = latency_s(achieved_s, memory_s, cost.nodes, on_chip_s,
                      efficiency_memory=hw.efficiency_memory,
                      node_overhead_us=hw.node_overhead_us)
    bound = "compute" if achieved_s >= memory_s / hw.efficiency_memory else "memory"
    if overhead_s > total - overhead_s:
        bound = "overhead"
    return {"floor_ms": max(floor_s, memory_s) * 1e3, "predicted_ms": total * 1e3,
            "compute_floor_ms": floor_s * 1e3, "memory_floor_ms": memory_s * 1e3,
            "compute_floor_by_ms": {k: t * 1e3 for k, t in by_key.items()},
            "overhead_ms": overhead_s * 1e3, "on_chip_ms": on_chip_s * 1e3,
            "bound": bound, "bytes": moved,
            "rates_used": used}


def plan_bundle(bundle, target=None, *, typical: dict | None = None) -> dict:
    """The plan of ``bundle`` on ``target`` (a name or profile; default: the bundle's own).
    ``typical`` overrides the family's typical answer (e.g. ``{"new_tokens": 16}``)."""
    from pcbedge.bundle.manifest import read_manifest_json
    from pcbedge.families import get_family
    from pcbedge.plan.graph_cost import graph_cost

    bundle = Path(bundle)
    if not bundle.is_dir():
        raise BundleError(f"bundle {bundle} not found", fix="pass a folder made by pcbedge "
                                                             "export or pcbedge build")
    manifest = read_manifest_json(bundle)
    if not manifest:
        raise BundleError(f"{bundle} holds no manifest.json", fix="pass a folder made by "
                          "pcbedge export or pcbedge build")
    family = get_family(manifest.get("family"))
    profile = _target_of(manifest, target)
    hw = profile.hardware
    calls, info = family.plan_calls(manifest, dict(typical or {}))
    costs, stages = {}, {s: _empty_stage() for s in STAGES}
    for c in calls:
        key = (c.graph, tuple(sorted(c.dims.items())))
        if key not in costs:
            path = bundle / manifest["graphs"][c.graph]["file"]
            try:
                costs[key] = graph_cost(path, c.dims, hw.float_precision, hw.fused_engine)
            except (OSError, ValueError) as e:     # missing, or not an ONNX protobuf
                raise BundleError(f"graph {path} cannot be read: {e}",
                                  fix="rebuild the bundle (pcbedge export / build)") from None
            except KeyError as e:
                raise PcbEdgeError(f"graph {c.graph} of {bundle} has an axis {e} the family's "
                                   "plan does not size", fix="report this: the family's plan "
                                   "module must size every named axis") from None
        cost, t = costs[key], _call_ms(costs[key], hw)
        st = stages[c.stage]
        st["calls"].append({"graph": c.graph, "what": c.what, "count": c.count, "dims": c.dims,
                            **cost.as_dict(), **t})
        for p, m in cost.macs.items():
            st["macs"][p] = st["macs"].get(p, 0) + m * c.count
        for k in ("floor_ms", "predicted_ms"):
            st[k] += t[k] * c.count
        st["bytes"] += t["bytes"] * c.count
    # the host prepares the vision stage's float inputs (decode, resize, normalise, patches):
    # its cost scales with the values it writes, whatever the family's image layout
    values = sum(c["input_float_values"] * c["count"] for c in stages["vision"]["calls"])
    info["host_values"] = values
    pre = stages["preprocess"]
    pre["predicted_ms"] = values * hw.host_ns_per_value * 1e-6
    pre["note"] = (f"host CPU, {values:.0f} float values of the vision inputs x "
                   f"{hw.host_ns_per_value} ns")
    for st in stages.values():
        st["macs_total"] = sum(st["macs"].values())
    p50 = sum(st["predicted_ms"] for st in stages.values())
    memory = _memory(bundle, manifest, costs, hw, info)
    return {
        "bundle": str(bundle), "family": manifest.get("family"), "target": profile.name,
        "hardware": {"device": hw.device, "source": hw.source, "calibration": hw.calibration,
                     "peak_tops": hw.peak_tops, "memory_bandwidth_gbs": hw.memory_bandwidth_gbs,
                     "memory_gb": hw.memory_gb, "efficiency_compute": hw.efficiency_compute,
                     "efficiency_compute_by_precision": hw.efficiency_compute_by_precision,
                     "efficiency_memory": hw.efficiency_memory,
                     "node_overhead_us": hw.node_overhead_us, "cache_mb": hw.cache_mb,
                     "float_precision": hw.float_precision, "fused_engine": hw.fused_engine},
        "typical_answer": info,
        "stages": stages,
        "decode_ms_per_token": (stages["decode"]["predicted_ms"] / info["decode_tokens"]
                                if info.get("decode_tokens") else None),
        "predicted_p50_ms": p50,
        "budget_ms": profile.latency_budget_ms,
        "meets_budget": p50 <= profile.latency_budget_ms,
        "memory": memory,
        "fits": memory["fits"],
    }


def _empty_stage() -> dict:
    return {"calls": [], "macs": {}, "bytes": 0.0, "floor_ms": 0.0, "predicted_ms": 0.0}


def _memory(bundle: Path, manifest: dict, costs: dict, hw, info: dict) -> dict:
    """Peak resident memory: every graph's weights (loaded once), the KV cache at its longest,
    the largest working set of one node, the runtime itself."""
    from pcbedge.plan.graph_cost import weight_bytes_of
    weights = sum(weight_bytes_of(bundle / g["file"], hw.float_precision)
                  for g in manifest["graphs"].values())
    kv = manifest.get("kv_cache") or {}
    item = {"float16": 2, "bfloat16": 2}.get(kv.get("dtype"), 4)
    kv_bytes = (2 * kv.get("num_layers", 0) * kv.get("num_heads", 0) * kv.get("head_dim", 0)
                * item * int(info.get("kv_positions", kv.get("max_positions", 0))))
    work = max((c.peak_node_bytes for c in costs.values()), default=0)
    mb = 2 ** 20
    peak = (weights + kv_bytes + work) / mb + hw.runtime_overhead_mb
    available = (hw.memory_gb - hw.memory_reserved_gb) * 1024
    return {"weights_mb": weights / mb, "kv_cache_mb": kv_bytes / mb,
            "largest_node_mb": work / mb, "runtime_mb": hw.runtime_overhead_mb,
            "peak_mb": peak, "available_mb": available, "fits": peak <= available}
