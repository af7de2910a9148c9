"""`pcbedge plan` of a bundle at Qwen3-VL-2B's sizes on the three Orin modules, beside NVIDIA's
published TensorRT Edge-LLM figures (issue 18; docs/plan.md, "Orin: the check on graphs").

The bundle: benchmarks/real_size/qwen3-vl-2b-sizes-as-qwen2-vl.config.json made with random
weights (`benchmarks/real_size.py make`), exported (`pcbedge export --no-check`: plan reads
graphs, and parity of random weights proves nothing here) and built with
benchmarks/real_size/edge-llm-like.toml (4-bit text weights with a float head, float vision:
the configuration of the published figures). The typical answer is sized as the published
benchmark: one image of 265 visual tokens (1,060 patches), a 292-token prefill, no pruning.

    python benchmarks/plan_edge_llm.py BUNDLE [--new-tokens 16] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

# NVIDIA TensorRT Edge-LLM v0.10.0, performance-benchmarks.md: Qwen3-VL-2B, INT4 AWQ text,
# FP16 vision, batch 1, 265 image tokens, 292-token prefill (averages)
PUBLISHED = {
    "orin-nano-8gb": {"vision": 141.0, "prefill": 167.0, "tok_s": 36.1},
    "orin-nx-16gb": {"vision": 77.0, "prefill": 94.0, "tok_s": 58.5},
    "agx-orin-64gb": {"vision": 36.0, "prefill": 46.0, "tok_s": 98.9},
}
TYPICAL = {"images": 1, "visual_tokens": 265, "text_tokens": 292 - 265, "keep_ratio": 1.0}
BAND = 0.30


def check(bundle: Path, new_tokens: int) -> dict:
    from pcbedge.plan import plan_bundle
    rows = {}
    for target, pub in PUBLISHED.items():
        p = plan_bundle(bundle, target, typical={**TYPICAL, "new_tokens": new_tokens})
        st = p["stages"]
        got = {"vision": st["vision"]["predicted_ms"], "prefill": st["prefill"]["predicted_ms"],
               "tok_s": 1e3 / p["decode_ms_per_token"]}
        err = {k: got[k] / pub[k] - 1 for k in pub}
        rows[target] = {"predicted": got, "published": pub, "error": err,
                        "within_30pct": all(abs(e) <= BAND for e in err.values()),
                        "macs": {s: st[s]["macs"] for s in ("vision", "prefill", "decode")},
                        "bytes": {s: st[s]["bytes"] for s in ("vision", "prefill", "decode")},
                        "typical_answer": p["typical_answer"], "memory": p["memory"],
                        "hardware": p["hardware"]}
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("bundle", type=Path)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    rows = check(args.bundle, args.new_tokens)
    print(f"{'target':<15} {'vision ms':>20} {'prefill ms':>20} {'decode tok/s':>22}")
    for t, r in rows.items():
        cells = [f"{r['predicted'][k]:7.1f} ({r['published'][k]:5.1f}, {r['error'][k]:+4.0%})"
                 for k in ("vision", "prefill", "tok_s")]
        print(f"{t:<15} {cells[0]:>20} {cells[1]:>20} {cells[2]:>22}"
              f"  {'within' if r['within_30pct'] else 'OUTSIDE'} +-30 %")
    if args.json:
        args.json.write_text(json.dumps({"bundle": str(args.bundle), "typical": TYPICAL,
                                         "new_tokens": args.new_tokens, "rows": rows},
                                        indent=2, default=float))
    return 0 if all(r["within_30pct"] for r in rows.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
