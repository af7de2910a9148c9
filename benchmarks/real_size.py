"""Real-size checkpoints without downloads: a published architecture (config files in
benchmarks/real_size/), random weights generated in-process, saved as save_pretrained's shards.

    python benchmarks/real_size.py make --config benchmarks/real_size/qwen2-vl-2b-instruct.config.json \\
        --out big/qwen2-vl-2b [--shard-size 2GB] [--layers N --vision-depth N] [--dtype bfloat16]
    python benchmarks/real_size.py time BUNDLE --new-tokens 16 [--keep-ratio 0.5] [--json F]

The answers of such a model are meaningless; it measures cost only (export memory and time,
bundle sizes, stage latencies, ``pcbedge plan``). The vocabulary keeps its published size
(151,936 rows of embedding and head), but the tokenizer is the tests' tiny Qwen-style one: the
config's special-token ids are replaced by its ids. ``--layers`` / ``--vision-depth`` make a
shallower model of the same widths (a smoke run of the pipeline). Config sources:
benchmarks/real_size/README.md.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

CLASSES = {"qwen2_vl": ("Qwen2VLConfig", "Qwen2VLForConditionalGeneration"),
           "qwen2_5_vl": ("Qwen2_5_VLConfig", "Qwen2_5_VLForConditionalGeneration")}


def make(config: Path, out: Path, shard_size: str, layers: int | None,
         vision_depth: int | None, seed: int = 0, dtype: str = "float32") -> Path:
    import torch
    import transformers as tf

    from pcbedge.families.qwen_vl.templates import QWEN2_VL_TEMPLATE
    from pcbedge.families.qwen_vl.testing import (QWEN_PREPROCESSOR, QWEN_SPECIAL_TOKENS,
                                                  tiny_qwen_tokenizer)

    cfg = json.loads(config.read_text())
    cfg_name, cls_name = CLASSES[cfg["model_type"]]
    tok = tiny_qwen_tokenizer()
    ids = {t: tok.token_to_id(t) for t in QWEN_SPECIAL_TOKENS}
    cfg.update(bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
               vision_start_token_id=ids["<|vision_start|>"],
               vision_end_token_id=ids["<|vision_end|>"], vision_token_id=ids["<|vision_pad|>"],
               image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"])
    if layers:
        cfg["num_hidden_layers"] = layers
    if vision_depth:
        v = cfg["vision_config"]
        v["depth"] = vision_depth
        if "fullatt_block_indexes" in v:
            v["fullatt_block_indexes"] = [vision_depth - 1]
    cfg.pop("torch_dtype", None)
    t0 = time.perf_counter()
    torch.manual_seed(seed)
    # built straight in ``dtype``: a 3B model in bfloat16 (as published) never holds 15 GB of fp32
    model = getattr(tf, cls_name)._from_config(getattr(tf, cfg_name)(**cfg),
                                               torch_dtype=getattr(torch, dtype)).eval()
    n = sum(p.numel() for p in model.parameters())
    print(f"built {cls_name} with {n / 1e9:.3f} B {dtype} parameters in "
          f"{time.perf_counter() - t0:.0f} s", flush=True)
    model.generation_config.eos_token_id = ids["<|im_end|>"]
    model.generation_config.pad_token_id = ids["<|endoftext|>"]
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True, max_shard_size=shard_size)
    tok.save(str(out / "tokenizer.json"))
    pre = {**QWEN_PREPROCESSOR, "patch_size": cfg["vision_config"]["patch_size"]}
    (out / "preprocessor_config.json").write_text(json.dumps(pre, indent=2))
    (out / "chat_template.jinja").write_text(QWEN2_VL_TEMPLATE)
    (out / "RANDOM_WEIGHTS.txt").write_text(
        f"Random {dtype} weights (seed {seed}) in the architecture of {config.name}: answers are "
        "meaningless; for cost measurements only.\n")
    print(f"saved to {out} in {time.perf_counter() - t0:.0f} s", flush=True)
    return out


def time_answers(bundle: Path, new_tokens: int, keep_ratio: float | None, repeats: int,
                 threads: int | None, method: str | None) -> dict:
    """One bundle's whole answer on the first board of the embedded sample, timed per stage in
    this process: a warm-up answer, then ``repeats`` timed ones (medians reported). Run each
    variant in its own process on an idle machine (docs/real-size.md)."""
    import os
    import resource
    import statistics

    from pcbedge.bundle.manifest import read_manifest_json
    from pcbedge.data.deeppcb import find_data_root, read_list
    from pcbedge.runtime import load_runner

    def rss_mb():
        with open("/proc/self/status") as fh:
            return {k: int(v.split()[0]) / 1024 for k, v in
                    (line.split(":", 1) for line in fh) if k in ("VmRSS", "RssAnon", "RssFile")}

    manifest = read_manifest_json(bundle)
    own = manifest.get("pruning") or {}
    if keep_ratio is None or keep_ratio >= 1.0:
        pruning = {"method": "none"}
    else:
        m = method or own.get("method")
        if not m or m == "none":
            raise SystemExit(f"{bundle} names no pruning method: pass --method")
        pruning = {"method": m, "keep_ratio": keep_ratio}
    board = read_list(find_data_root(None), "bench.txt")[0]
    load0 = os.getloadavg()[0]
    t0 = time.perf_counter()
    runner = load_runner(bundle, threads=threads)
    load_s = time.perf_counter() - t0
    rss_loaded = rss_mb()
    q = "where are the defects on this board?"

    def one():
        t = time.perf_counter()
        enc = runner.encode(runner.prepare(board.test_path, board.template_path))
        ans = runner.answer(enc, q, max_new_tokens=new_tokens, pruning=pruning)
        ans["latency_ms"]["wall"] = (time.perf_counter() - t) * 1e3
        return ans

    one()                                   # warm-up: first-run allocations, page faults
    runs = [one() for _ in range(repeats)]
    lat = {k: statistics.median(r["latency_ms"][k] for r in runs)
           for k in ("vision", "prefill", "decode", "wall")}
    n_new = runs[0]["info"]["new_tokens"]
    lat["per_token"] = lat["decode"] / max(n_new - 1, 1)   # the first comes from the prefill
    return {"bundle": str(bundle), "precision": manifest.get("precision"),
            "new_tokens": n_new, "pruning": pruning,
            "prefill_tokens": runs[0]["info"]["prefill_tokens"],
            "visual_tokens": [runs[0]["info"]["visual_tokens_kept"],
                              runs[0]["info"]["visual_tokens_total"]],
            "repeats": repeats, "threads": getattr(runner, "threads", threads),
            "median_ms": {k: round(v, 1) for k, v in lat.items()},
            "all_wall_ms": [round(r["latency_ms"]["wall"], 1) for r in runs],
            "load_s": round(load_s, 1), "rss_after_load_mb": rss_loaded,
            "rss_end_mb": rss_mb(),
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "loadavg_1min_before": load0, "board": f"{board.group}/{board.id}",
            "note": "random weights: answers are meaningless, only cost is measured"}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("make")
    m.add_argument("--config", type=Path, required=True)
    m.add_argument("--out", type=Path, required=True)
    m.add_argument("--shard-size", default="2GB")
    m.add_argument("--layers", type=int)
    m.add_argument("--vision-depth", type=int)
    m.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32",
                   help="weights' type on disk (published checkpoints are bfloat16)")
    t = sub.add_parser("time", help="time one bundle's answer per stage (own process)")
    t.add_argument("bundle", type=Path)
    t.add_argument("--new-tokens", type=int, default=16)
    t.add_argument("--keep-ratio", type=float, help="visual tokens kept (default: all)")
    t.add_argument("--method", help="pruning method when the bundle names none")
    t.add_argument("--repeats", type=int, default=3)
    t.add_argument("--threads", type=int)
    t.add_argument("--json", type=Path, help="also write the result here")
    args = ap.parse_args(argv)
    if args.cmd == "make":
        make(args.config, args.out, args.shard_size, args.layers, args.vision_depth,
             dtype=args.dtype)
        return 0
    out = time_answers(args.bundle, args.new_tokens, args.keep_ratio, args.repeats,
                       args.threads, args.method)
    text = json.dumps(out, indent=2)
    print(text)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
