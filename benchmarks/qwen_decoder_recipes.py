"""Which decoder recipe per target for Qwen-VL: the drift of each recipe against FP32, measured by
the build itself (its ``drift_vs_fp32`` record), on random-weight tiny checkpoints.

    PYTHONPATH=. python benchmarks/qwen_decoder_recipes.py [--hidden 64] [--out FILE.json]

For each variant (Qwen2-VL, Qwen2.5-VL) it exports a tiny random model once and builds the
x86-cpu recipe with the decoder as fp32, INT8 dynamic, INT8 static (calibrated on the embedded
sample) and weight-only 4-bit (block 32), the vision tower INT8 in every case, via a profile
written next to the export. Random weights: this bounds the numeric error of each recipe, not
answer accuracy (docs/qwen2-vl.md). Each build prints its drift; a table is printed at the end.
"""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

RECIPES = {"fp32": {"decoder": "fp32"},
           "int8-dynamic": {"decoder": "int8", "decoder_method": "dynamic"},
           "int8-static": {"decoder": "int8", "decoder_method": "static"},
           "int4-weight": {"decoder": "int4"}}


def profile_text(base: str, name: str, recipe: dict) -> str:
    """The x86-cpu profile with its qwen_vl decoder override replaced by ``recipe``."""
    head = base.split("# --- Qwen2-VL")[0].replace('name = "x86-cpu"', f'name = "{name}"')
    q = ['vision_ops = ["MatMul", "Gemm"]', "score_bias_boards = 0"]
    if recipe["decoder"] == "int8" and recipe.get("decoder_method") == "static":
        q.append('decoder_ops = ["MatMul", "Gemm"]')
    if "decoder_method" in recipe:
        q.append(f'decoder_method = "{recipe["decoder_method"]}"')
    return (head + f'\n[family.qwen_vl.precision]\ndecoder = "{recipe["decoder"]}"\n\n'
            "[family.qwen_vl.quantization]\n" + "\n".join(q) + "\n\n"
            '[family.qwen_vl.pruning]\nmethod = "template_diff"\nkeep_ratio = 0.5\n')


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    from pcbedge import api
    from pcbedge.targets import TARGETS_DIR
    from pcbedge.families.qwen_vl.testing import tiny_qwen2_vl

    base = (TARGETS_DIR / "x86-cpu.toml").read_text()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for variant in ("qwen2_vl", "qwen2_5_vl"):
            ckpt = tiny_qwen2_vl(root, variant, hidden=args.hidden)
            export = api.export_model(ckpt, root / f"{variant}-export", check_boards=0,
                                      parity_sizes=[(56, 84)], progress=False)
            for label, recipe in RECIPES.items():
                prof = root / f"r-{label}.toml"
                prof.write_text(profile_text(base, f"r-{label}", recipe))
                out = api.build_bundle(prof, export, root / f"{variant}-{label}", progress=False)
                m = json.loads((out / "manifest.json").read_text())
                groups = (m.get("quantization") or {}).get("groups", {})
                drift = (groups.get("decoder") or groups.get("vision") or {}).get(
                    "drift_vs_fp32", {})
                size = sum(f["bytes"] for k, f in m["files"].items()
                           if k.startswith("decoder"))
                rows.append({"variant": variant, "decoder": label, "decoder_bytes": size,
                             **{k: drift.get(k) for k in ("first_logits_rel_l2",
                                                          "image_embeds_rel_l2",
                                                          "token_prefix_agreement",
                                                          "answers_identical")}})
                print(json.dumps(rows[-1]), flush=True)
    print(f"\n{'variant':<12}{'decoder':<14}{'bytes':>9}{'logits rel L2':>15}"
          f"{'token agreement':>17}{'identical':>11}")
    for r in rows:
        print(f"{r['variant']:<12}{r['decoder']:<14}{r['decoder_bytes']:>9}"
              f"{r['first_logits_rel_l2'] or 0:>15.4f}{r['token_prefix_agreement'] or 0:>17.2f}"
              f"{r['answers_identical'] or '-':>11}")
    if args.out:
        args.out.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
