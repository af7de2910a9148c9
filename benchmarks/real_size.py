"""Real-size checkpoints without downloads: a published architecture (config files in
benchmarks/real_size/), random weights generated in-process, saved as save_pretrained's shards.

    python benchmarks/real_size.py make --config benchmarks/real_size/qwen2-vl-2b-instruct.config.json \\
        --out big/qwen2-vl-2b [--shard-size 2GB] [--layers N --vision-depth N]

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
         vision_depth: int | None, seed: int = 0) -> Path:
    import torch
    import transformers as tf

    from pcbedge.families.qwen_vl.templates import QWEN2_VL_TEMPLATE
    from pcbedge.testing import QWEN_PREPROCESSOR, QWEN_SPECIAL_TOKENS, tiny_qwen_tokenizer

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
    model = getattr(tf, cls_name)(getattr(tf, cfg_name)(**cfg)).eval()
    n = sum(p.numel() for p in model.parameters())
    print(f"built {cls_name} with {n / 1e9:.3f} B parameters in "
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
        f"Random weights (seed {seed}) in the architecture of {config.name}: answers are "
        "meaningless; for cost measurements only.\n")
    print(f"saved to {out} in {time.perf_counter() - t0:.0f} s", flush=True)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("make")
    m.add_argument("--config", type=Path, required=True)
    m.add_argument("--out", type=Path, required=True)
    m.add_argument("--shard-size", default="2GB")
    m.add_argument("--layers", type=int)
    m.add_argument("--vision-depth", type=int)
    args = ap.parse_args(argv)
    make(args.config, args.out, args.shard_size, args.layers, args.vision_depth)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
