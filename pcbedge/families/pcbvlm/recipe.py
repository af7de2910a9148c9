"""The reference model's side of a build: its calibration feeds, the target's input size, the
INT8 vision graph's score bias correction and drift check, TensorRT shape ranges."""
from __future__ import annotations

from pathlib import Path

DRIFT_BOARDS = 8          # bench boards (validation side) the quantization drift is measured on
MIN_VISUAL_TOKENS = 16
OPT_QUESTION_TOKENS = 16


def apply_shapes(manifest: dict, shapes, say) -> None:
    """The target's input side: the vision graph takes any multiple of the token stride."""
    from pcbedge.errors import TargetError

    size = int(shapes.input_size)
    stride = int(manifest.get("visual_token_stride", 32))
    if size % stride:
        raise TargetError(f"shapes.input_size {size} is not a multiple of {stride}, the visual-"
                          f"token stride of this {manifest['family']} export",
                          fix=f"use a multiple of {stride} (e.g. {size // stride * stride})")
    exported = int(manifest["input_size"])
    if size != exported:
        say(f"note: the export was made at {exported}x{exported}; target runs it at {size}x{size}"
            f" (shapes.input_size of the profile; the vision graph takes any multiple of "
            f"{stride})")
    manifest["input_size"] = size
    manifest["visual_tokens"] = (size // stride) ** 2
    manifest.setdefault("preprocess", {})["input_size"] = size


def iter_vision_inputs(cal_set, input_size: int):
    """``{"pixel_values": float32 [1, 3, S, S]}`` per board of a calibration set, through the
    family's ``load_pair`` (aligned test, template, |difference|)."""
    import numpy as np

    from pcbedge.data.preprocess import load_pair
    for e in cal_set.entries:
        x, _ = load_pair(e.test_path, e.template_path, input_size)
        yield {"pixel_values": np.ascontiguousarray(x[None], dtype=np.float32)}


def calibration_feeds(group: str, role: str, export_dir: Path, manifest: dict, cal_set):
    from pcbedge.errors import TargetError
    if role != "vision":
        raise TargetError(f"static INT8 of the {role} graph is not calibrated by pcbedge for this "
                          "family: measured on the x86 reference box, int8 MatMuls give its "
                          "per-token decoder step nothing (docs/build.md)",
                          fix="set precision.decoder to 'fp32' (or 'fp16' for TensorRT)")
    return iter_vision_inputs(cal_set, int(manifest["input_size"]))


def after_quantize(group: str, stage: Path, export_dir: Path, manifest: dict, profile, cal_set,
                   say) -> dict:
    """Vision: the score bias correction, then the drift against FP32 on bench boards."""
    from pcbedge.recipes.quantize import measure_drift

    if group != "vision":
        return {}
    rel = manifest["graphs"]["vision"]["file"]
    bias = correct_score_bias(stage / rel, export_dir / rel, manifest, profile, cal_set, say)
    drift = measure_drift(export_dir / rel, stage / rel, _drift_feeds(int(manifest["input_size"])))
    det = drift.get("detections")
    say(f"  drift vs fp32 on {DRIFT_BOARDS} bench boards: visual tokens "
        f"{drift['visual_tokens']['mean']:.4f} (rel. L2)" + (
            f"; {100 * det['kept']:.1f}% of {det['fp32_detections']} fp32 detections kept"
            if det else ""))
    return {"graphs": {"vision": {"score_bias": bias, "drift_vs_fp32": drift}}}


def correct_score_bias(graph: Path, reference: Path, manifest: dict, profile, cal_set,
                       say) -> dict | None:
    """The INT8 graph's detection scores brought back onto FP32's (:mod:`.score_bias`),
    measured on up to ``score_bias_boards`` boards of the calibration source that the scales
    were not fitted to, in their 8 dihedral views; the manifest's record of it. Too few such
    boards or matched proposals: no correction, and the build says so."""
    from pcbedge.calibration import MIN_BOARDS, select_heldout_set
    from pcbedge.families.pcbvlm.score_bias import (MIN_MATCHES, decision_band, dihedral_views,
                                                    estimate_score_bias, fold_score_offset)

    n = profile.quantization.score_bias_boards
    if not n:
        return None
    held = select_heldout_set(cal_set, n)
    if len(held) < MIN_BOARDS:
        reason = (f"the calibration source {cal_set.root} holds {len(held)} board(s) beyond the "
                  f"{len(cal_set)} calibrated on; the correction needs at least {MIN_BOARDS} "
                  "(pass --calibration DIR with more boards of the line)")
        say(f"  score bias correction skipped: {reason}")
        return {"applied": False, "reason": reason}
    center = float((manifest.get("answer") or {}).get("grammar", {})
                   .get("region_prior_center", 0.5))
    est = estimate_score_bias(reference, graph,
                              dihedral_views(iter_vision_inputs(held, int(manifest["input_size"]))),
                              decision_band(center))
    record = {**est, "boards": [e.board_id for e in held.entries], "sha256": held.sha256}
    if est["matched"] < MIN_MATCHES:
        reason = (f"only {est['matched']} proposals in the decision band on {len(held)} boards "
                  f"(needs {MIN_MATCHES})")
        say(f"  score bias correction skipped: {reason}")
        return {**record, "applied": False, "reason": reason}
    conv = fold_score_offset(graph, est["offset"])
    say(f"  score bias: int8 scored fp32's proposals {est['offset']:+.4f} logit "
        f"(+- {est['stderr']:.4f}, {est['matched']} matched, {len(held)} held-out boards x 8 "
        f"views, {est['gated']} zeroed by an in-graph rule left out); subtracted from {conv}'s "
        "bias")
    return {**record, "applied": True, "conv": conv}


def _drift_feeds(size: int):
    from pcbedge.data.deeppcb import find_data_root, read_list
    from pcbedge.data.preprocess import load_pair

    for b in read_list(find_data_root(None), "bench.txt")[:DRIFT_BOARDS]:
        yield {"pixel_values": load_pair(b.test_path, b.template_path, size)[0][None]}


def trt_axis_ranges(manifest: dict, profile, pruning) -> dict[str, tuple[int, int, int]]:
    """(min, opt, max) of every named dynamic axis of the three graphs."""
    from pcbedge.runtime.pruning import token_budget

    s = profile.shapes
    n_vis = (s.input_size // int(manifest.get("visual_token_stride", 32))) ** 2
    k = int(manifest["num_regions"])
    text = min(s.max_text_len, int(manifest["max_text_len"]))
    opt_vis = token_budget(n_vis, pruning)
    opt_seq = min(OPT_QUESTION_TOKENS, text)
    return {
        "batch": (s.batch,) * 3,
        "height": (s.input_size,) * 3,
        "width": (s.input_size,) * 3,
        "n_vis": (min(MIN_VISUAL_TOKENS, n_vis), opt_vis, n_vis),
        "seq": (1, opt_seq, text),
        # the cache after the prefill: visual tokens + regions + question, growing per step
        "past_seq": (1, opt_vis + k + opt_seq + 8, n_vis + k + text),
    }
