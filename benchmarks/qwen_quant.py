"""Quantize a Qwen2-VL bundle's graphs and measure what it costs against FP32.

    PYTHONPATH=. python benchmarks/qwen_quant.py --size tiny
    PYTHONPATH=. python benchmarks/qwen_quant.py --size mid --tokens 20

Variants (each one graph replaced, the others FP32):

* ``vision_int8_static``: the vision graph, onnxruntime static QDQ (:func:`quantize_graph`,
  MatMul/Gemm with weight B; activation MatMuls, Softmax, LayerNorm stay float), calibrated on
  a small iterator of board-like images that are not the evaluation images;

(all through :func:`pcbedge.families.qwen_vl.recipe.quantize_qwen_bundle`, the library entry point)
* ``decoder_int8_dynamic``: the decoder, ``quantize_dynamic`` (int8 weights, per-row dynamic
  activation scales), MatMul only;
* ``decoder_int8_static``: the decoder, static QDQ calibrated on prefill and step feeds;
* ``decoder_int4_weight``: the decoder, weight-only 4-bit (``MatMulNBitsQuantizer``, block 32,
  symmetric), activations float.

Per variant: max |logit - FP32 logit| over the prefill and every greedy step (teacher-forced on
the FP32 tokens, so one early flip does not hide the rest), and greedy token agreement: the
share of positions where the variant's own greedy answer equals FP32's, and the length of the
common prefix. Random weights: the numbers bound the numeric error of each scheme, not the
answer quality of a trained model (docs/qwen2-vl.md).
"""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np

QUESTION = "where are the defects on this board?"
def _variants():
    from pcbedge.families.qwen_vl.recipe import QwenQuantConfig
    return {"vision_int8_static": QwenQuantConfig(vision="int8_static", decoder="fp32"),
            "decoder_int8_dynamic": QwenQuantConfig(vision="fp32", decoder="int8_dynamic"),
            "decoder_int8_static": QwenQuantConfig(vision="fp32", decoder="int8_static"),
            "decoder_int4_weight": QwenQuantConfig(vision="fp32", decoder="int4_weight")}


SIZES = {"tiny": dict(hidden=64, layers=2, heads=4, kv_heads=2, vision_dim=32, vision_depth=2),
         "mid": dict(hidden=512, layers=4, heads=8, kv_heads=2, vision_dim=128,
                     vision_depth=2)}


def build_bundle(root: Path, size: str) -> Path:
    from pcbedge.export.exporter import export_model
    from pcbedge.testing import tiny_qwen2_vl

    model_dir = tiny_qwen2_vl(root, "qwen2_vl", name=f"{size}-qwen2-vl", **SIZES[size])
    return export_model(model_dir, root / "bundle", check=False, progress=False)


def _runner(bundle: Path):
    from pcbedge.bundle.manifest import read_manifest
    from pcbedge.families.qwen_vl.runner import QwenRunner
    return QwenRunner.from_manifest(bundle, read_manifest(bundle), threads=2)


def _boards(n: int, side: int, seed: int) -> list:
    from pcbedge.families.qwen_vl.parity import random_board
    return [random_board(side, side, seed + i) for i in range(n)]


def quantize_variants(bundle: Path, work: Path, calib_images) -> dict[str, Path]:
    """{variant: bundle folder}, each quantized by :func:`quantize_qwen_bundle` with one graph
    quantized and the other FP32."""
    from pcbedge.families.qwen_vl.recipe import quantize_qwen_bundle

    out = {}
    for name, cfg in _variants().items():
        try:
            out[name] = quantize_qwen_bundle(bundle, work / name, cfg, calibration=calib_images)
        except Exception as e:  # report the scheme that fails, keep measuring the others
            print(f"{name}: FAILED {type(e).__name__}: {str(e).splitlines()[0][:200]}")
    return out


def greedy(runner, prompt, n: int, forced: list[int] | None = None):
    """Greedy ids and per-step logits; with ``forced`` the given ids are fed instead."""
    embeds, pos, nxt, _ = runner.prefill_inputs(prompt, runner.pruning)
    dec, emb = runner.sessions["decoder"], runner.sessions["embed"]
    logits, past = dec.run(None, {"inputs_embeds": embeds, "position_ids": pos,
                                  "past": np.zeros(runner.kv_shape, np.float32)})
    ids, all_logits = [], [logits[0]]
    for i in range(n):
        tok = int(logits[0].argmax()) if forced is None else forced[i]
        ids.append(int(logits[0].argmax()))
        if i == n - 1:
            break
        e = emb.run(None, {"input_ids": np.array([[tok]], np.int64)})[0]
        logits, past = dec.run(None, {"inputs_embeds": e, "past": past,
                                      "position_ids": np.full((3, 1, 1), nxt + i, np.int64)})
        all_logits.append(logits[0])
    return ids, np.stack(all_logits)


def evaluate(bundle: Path, variants: dict[str, Path], images, tokens: int) -> dict:
    fp32 = _runner(bundle)
    refs = []
    for img in images:
        prompt = fp32.encode_images(fp32.build_prompt(img, QUESTION))
        refs.append((img, *greedy(fp32, prompt, tokens)))
    res = {}
    for name, d in variants.items():
        r = _runner(d)
        err, agree, prefix = 0.0, [], []
        for img, ref_ids, ref_logits in refs:
            prompt = r.encode_images(r.build_prompt(img, QUESTION))
            _, forced_logits = greedy(r, prompt, tokens, forced=ref_ids)
            err = max(err, float(np.abs(forced_logits - ref_logits).max()))
            own, _ = greedy(r, prompt, tokens)
            agree.append(float(np.mean(np.asarray(own) == np.asarray(ref_ids))))
            same = np.asarray(own) == np.asarray(ref_ids)
            prefix.append(int(np.argmin(same)) if not same.all() else tokens)
        scale = float(np.abs(np.stack([r_[2] for r_ in refs])).max())
        res[name] = {"logit_max_abs": round(err, 5), "fp32_logit_max": round(scale, 3),
                     "token_agreement": round(float(np.mean(agree)), 4),
                     "common_prefix_mean": round(float(np.mean(prefix)), 2)}
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", choices=sorted(SIZES), default="tiny")
    ap.add_argument("--side", type=int, default=224, help="square image side in pixels")
    ap.add_argument("--calibration", type=int, default=4, help="calibration images")
    ap.add_argument("--eval", type=int, default=3, help="evaluation images")
    ap.add_argument("--tokens", type=int, default=20, help="greedy tokens per answer")
    ap.add_argument("--out", type=Path, help="write the result JSON here")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="qwen-quant-") as tmp:
        root = Path(tmp)
        bundle = build_bundle(root, args.size)
        calib = _boards(args.calibration, args.side, seed=1000)
        evals = _boards(args.eval, args.side, seed=0)
        variants = quantize_variants(bundle, root / "variants", calib)
        res = evaluate(bundle, variants, evals, args.tokens)
    print(f"model: {args.size} random Qwen2-VL, {args.side}x{args.side} images, "
          f"{args.tokens} greedy tokens x {args.eval} images")
    for name, r in res.items():
        print(f"{name:22s} logit max-abs {r['logit_max_abs']:.5f} (FP32 |logit| max "
              f"{r['fp32_logit_max']}), token agreement {r['token_agreement']:.3f}, "
              f"common prefix {r['common_prefix_mean']}")
    if args.out:
        args.out.write_text(json.dumps({"size": args.size, "results": res}, indent=2) + "\n")


if __name__ == "__main__":
    main()
