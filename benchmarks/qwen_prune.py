"""Prefill latency of a Qwen2-VL bundle with and without visual-token pruning.

    PYTHONPATH=. python benchmarks/qwen_prune.py --threads 2 --runs 20

Builds a random-weight Qwen2-VL of mid size in-process (text hidden 512, 4 layers, 8 heads;
vision 128 wide, depth 2), exports it (no parity check: latency does not depend on the
weights), and times the decoder prefill on a 448x448 board image (256 visual tokens) at keep
ratio 1.0 and 0.5 (``feature_norm``), interleaved round by round so background load hits both
alike. Prints the median and P95 per keep ratio and the speedup; ``--bundle DIR`` times an
existing Qwen-VL bundle instead.
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

KEEPS = (1.0, 0.5)
QUESTION = "where are the defects on this board?"


def build_bundle(root: Path) -> Path:
    from pcbedge.export.exporter import export_model
    from pcbedge.families.qwen_vl.testing import tiny_qwen2_vl

    model_dir = tiny_qwen2_vl(root, "qwen2_vl", name="mid-qwen2-vl", hidden=512, layers=4,
                              heads=8, kv_heads=2, vision_dim=128, vision_depth=2)
    return export_model(model_dir, root / "bundle", check=False, progress=False)


def time_prefill(bundle: Path, side: int, runs: int, warmup: int, threads: int) -> dict:
    from pcbedge.families.qwen_vl.parity import random_board
    from pcbedge.runtime import load_runner
    from pcbedge.runtime.pruning import TokenPruningConfig

    runner = load_runner(bundle, threads=threads)
    enc = runner.encode(runner.prepare(random_board(side, side, 0)))
    ids = runner.prompt(QUESTION, enc.prepared.inputs)
    feeds = {}
    for keep in KEEPS:
        cfg = TokenPruningConfig("feature_norm" if keep < 1 else "none", keep, 1)
        embeds, pos, _, mask = runner.prefill_inputs(ids, enc, cfg)
        feeds[keep] = ({"inputs_embeds": embeds, "position_ids": pos,
                        "past": np.zeros(runner.kv_shape, np.float32)}, int(mask.sum()))
    dec = runner.sessions["decoder"]
    times: dict[float, list[float]] = {k: [] for k in KEEPS}
    for i in range(warmup + runs):
        for keep in KEEPS:
            t0 = time.perf_counter()
            dec.run(None, feeds[keep][0])
            if i >= warmup:
                times[keep].append((time.perf_counter() - t0) * 1000)
    out = {"visual_tokens": int(np.sum(np.asarray(ids) == runner.image_token_id)),
           "threads": threads, "runs": runs, "keeps": {}}
    for keep, ts in times.items():
        ts.sort()
        out["keeps"][str(keep)] = {"prefill_tokens": feeds[keep][1],
                                   "median_ms": round(statistics.median(ts), 2),
                                   "p95_ms": round(ts[min(len(ts) - 1, int(0.95 * len(ts)))], 2)}
    k = out["keeps"]
    out["speedup_median"] = round(k["1.0"]["median_ms"] / k["0.5"]["median_ms"], 3)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bundle", type=Path, help="an existing Qwen-VL bundle (default: build one)")
    ap.add_argument("--side", type=int, default=448, help="square image side in pixels")
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, help="write the result JSON here")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="qwen-prune-") as tmp:
        bundle = args.bundle or build_bundle(Path(tmp))
        res = time_prefill(bundle, args.side, args.runs, args.warmup, args.threads)
    for keep, r in res["keeps"].items():
        print(f"keep {keep}: prefill {r['prefill_tokens']} tokens, median {r['median_ms']} ms, "
              f"p95 {r['p95_ms']} ms")
    print(f"prefill speedup at keep 0.5: {res['speedup_median']}x "
          f"({res['visual_tokens']} visual tokens, {res['threads']} threads)")
    if args.out:
        args.out.write_text(json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    main()
