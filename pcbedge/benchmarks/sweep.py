"""Precision x visual-token keep-ratio sweep: what each recipe costs in accuracy and buys in P95.

Precisions: the bundle's own, and its FP32 reference when there is one. Keep ratios: 1.0, 0.5,
0.25, 0.1, through the runner's ``pruning=`` override with the bundle's pruning method (or
the first token score of its family when the bundle does not prune). Each point: describe-all accuracy on every board
and a shorter SingleStream latency pass (a quarter of the main pass's queries and duration).
"""
from __future__ import annotations

from pathlib import Path

from pcbedge.benchmarks import workload as wl
from pcbedge.benchmarks.accuracy import describe_predictions, score_detections
from pcbedge.bundle.manifest import read_manifest_json
from pcbedge.benchmarks.metrics import latency_summary

KEEP_RATIOS = (1.0, 0.5, 0.25, 0.1)
DEFAULT_METHOD = "model_prior"


def _precision_label(manifest: dict, fallback: str) -> str:
    p = manifest.get("precision")
    if isinstance(p, dict) and p:
        vals = [str(p[k]) for k in ("vision", "decoder") if k in p] or \
            [str(v) for v in p.values() if not isinstance(v, (dict, list))]
        return "/".join(dict.fromkeys(vals)) or fallback
    return str(p) if p else fallback


def pruning_method(manifest: dict) -> str:
    """The bundle's pruning method, else the first token score its family exports."""
    block = manifest.get("pruning")
    method = block.get("method") if isinstance(block, dict) else None
    scores = list(manifest.get("token_scores") or {}) or [DEFAULT_METHOD]
    return method if method and method != "none" else scores[0]


def _point(path: Path, precision: str, role: str, ratio: float, method: str,
           workload: wl.Workload, pass_args: dict, threads, progress: bool) -> dict:
    from pcbedge.runtime.pruning import TokenPruningConfig

    pruning = TokenPruningConfig(method=method, keep_ratio=ratio)
    runner = wl.open_runner(path, threads=threads, pruning=pruning)
    label = f"{precision} keep {ratio:g}"
    answers = wl.answer_boards(runner, workload, describe_only=True, progress=progress,
                               desc=f"sweep {label}")
    gts = [wl.board_ground_truth(b) for b in workload.boards]
    det = score_detections(gts, describe_predictions(workload, answers))
    lat = wl.latency_pass(runner, workload, progress=progress, **pass_args)
    close = getattr(runner, "close", None)
    if callable(close):
        close()
    summary = latency_summary([r["total"] for r in lat["records"]])
    return {"label": label, "role": role, "precision": precision, "keep_ratio": ratio,
            "pruning_method": method, "deeppcb_map": det["deeppcb_map"],
            "count_exact_match": det["count_exact_match"],
            "hallucination_rate": det["hallucination_rate"],
            "p50_ms": summary["p50"], "p95_ms": summary["p95"], "n_latency": summary["n"]}


def run_sweep(bundle: Path, reference: Path | None, manifest: dict, workload: wl.Workload, *,
              threads=None, queries: int = 200, min_seconds: float = 10.0, warmup: int = 5,
              progress: bool = True) -> list[dict]:
    """One row per (precision, keep ratio): label, precision, keep_ratio, deeppcb_map,
    count_exact_match, hallucination_rate, p50_ms, p95_ms."""
    variants = [(Path(bundle), _precision_label(manifest, "bundle"), "bundle")]
    if reference is not None and Path(reference).resolve() != Path(bundle).resolve():
        ref_manifest = read_manifest_json(reference)
        variants.append((Path(reference), _precision_label(ref_manifest, "fp32"), "reference"))
    if len({v[1] for v in variants}) < len(variants):  # same precision text: say which is which
        variants = [(p, f"{label} ({role})", role) for p, label, role in variants]
    method = pruning_method(manifest)
    pass_args = {"queries": max(5, queries // 4), "min_seconds": min_seconds / 4,
                 "warmup": min(warmup, 2)}
    return [_point(path, precision, role, ratio, method, workload, pass_args, threads, progress)
            for path, precision, role in variants for ratio in KEEP_RATIOS]
