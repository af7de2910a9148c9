"""Qwen-VL's side of a build: the target's pixel budget, calibration feeds of the vision tower
(board and template images of the calibration boards) and of the decoder (prefill and cached
greedy steps run with the FP32 export), and the drift of each quantized group against FP32.

The decoder's recipe is the target's: weight-only 4-bit (MatMulNBits) or INT8 (dynamic, or
static Q/DQ calibrated here); ``embed`` (a Gather) stays FP32. What each target chose and the
drift measured: docs/qwen2-vl.md.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

CALIBRATION_QUESTION = "where are the defects on this board?"
DECODER_STEPS = 4          # int8 static: cached greedy steps per image in the calibration
DRIFT_BOARDS = 2           # embedded-sample boards the build's drift check answers
DRIFT_TOKENS = 16
QUESTION_TOKENS = 64       # TensorRT opt shape of the text part of a prompt
CALIBRATION_TILE_PATCHES = 256   # vision calibration feeds: at most this many patches each


def apply_shapes(manifest: dict, shapes, say) -> None:
    """The target's input side caps the image's pixel budget (fewer visual tokens); a larger
    side than the checkpoint's budget leaves it as it was fine-tuned."""
    pre = manifest["preprocess"]
    f = int(pre["patch_size"]) * int(pre["merge_size"])
    side = int(shapes.input_size) // f * f
    if side * side < int(pre["max_pixels"]):
        say(f"note: the target's input size caps the image at {side}x{side} pixels "
            f"(max_pixels {pre['max_pixels']} -> {side * side})")
        pre["max_pixels"] = side * side
        manifest["input_size"] = side
        manifest["visual_tokens"] = (side // f) ** 2


def _fp32_runner(export_dir: Path, manifest: dict):
    from pcbedge.families.qwen_vl.runner import QwenVlOnnxRunner
    return QwenVlOnnxRunner(export_dir, pruning={"method": "none"}, threads=None)


def _board_images(cal_set) -> list[tuple[np.ndarray, np.ndarray]]:
    from pcbedge.families.qwen_vl.preprocess import load_rgb
    return [(load_rgb(e.test_path), load_rgb(e.template_path)) for e in cal_set.entries]


def calibration_feeds(group: str, role: str, export_dir: Path, manifest: dict, cal_set):
    """Vision: each image (board and template) of each calibration board, as the runner resizes
    it, in tiles of at most ``CALIBRATION_TILE_PATCHES`` patches (one feed each): onnxruntime's
    calibrator keeps every calibrated tensor of a run alive to its end, 12 GB for one
    1,024-patch image of a 2B vision tower, a quarter of that for a quarter of the patches;
    together the tiles cover every pixel at the inference scale. Decoder: the prefill and
    ``DECODER_STEPS - 1`` cached greedy steps per board, run in FP32."""
    from pcbedge.families.qwen_vl.runner import QwenVlOnnxRunner
    if role == "vision":       # preprocessing only: no session is opened
        host = QwenVlOnnxRunner(export_dir, manifest, pruning={"method": "none"},
                                sessions=False)
        return [f for pair in _board_images(cal_set) for image in pair
                for f in _tile_feeds(host, image)]
    runner = _fp32_runner(export_dir, manifest)
    try:
        feeds = []
        for test, template in _board_images(cal_set):
            feeds += decoder_feeds(runner, runner.encode(runner.prepare(test, template)),
                                   DECODER_STEPS)
        return feeds
    finally:
        runner.close()


def _tile_feeds(host, image: np.ndarray) -> list[dict]:
    from PIL import Image

    r = host.recipe
    h, w = host.prepare(image).inputs.resized[0]
    f = r.patch_size * r.merge_size
    side = max(f, int(np.sqrt(CALIBRATION_TILE_PATCHES)) * r.patch_size // f * f)
    resized = np.asarray(Image.fromarray(image).resize((w, h), Image.BICUBIC))
    feeds = []
    for y in range(0, h, side):
        for x in range(0, w, side):
            tile = resized[y:y + side, x:x + side]
            if min(tile.shape[:2]) >= f:
                feeds.append(host.vision_feeds(host.prepare(tile).inputs))
    return feeds


def decoder_feeds(runner, enc, steps: int) -> list[dict]:
    """Prefill feeds and ``steps - 1`` cached greedy step feeds of one encoded board."""
    dec, emb = runner.sessions["decoder"], runner.sessions["embed"]
    ids = runner.prompt(CALIBRATION_QUESTION, enc.prepared.inputs)
    embeds, pos, nxt, _ = runner.prefill_inputs(ids, enc, runner.pruning)
    f = {"inputs_embeds": embeds, "position_ids": pos,
         "past": np.zeros(runner.kv_shape, np.float32)}
    out = []
    for i in range(steps):
        out.append(f)
        logits, present = dec.run(None, f)
        tok = np.array([[int(logits[0].argmax())]], np.int64)
        f = {"inputs_embeds": emb.run(None, {"input_ids": tok})[0],
             "position_ids": np.full((3, 1, 1), nxt + i, np.int64), "past": present}
    return out


def _rel_l2(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / max(float(np.linalg.norm(b)), 1e-12))


def measure_drift(export_dir: Path, stage: Path, manifest: dict, boards: int = DRIFT_BOARDS,
                  tokens: int = DRIFT_TOKENS) -> dict:
    """The staged graphs against the FP32 export on embedded-sample boards (board + template):
    image embeddings and first-token logits (relative L2), greedy tokens (share of the FP32
    answer's tokens reproduced before the first difference, and exact answers).

    The FP32 pass runs first and its runner is closed before the staged graphs open: at a 2B
    model's size the two sets of sessions would not fit the build box together."""
    from pcbedge.data.deeppcb import find_data_root, read_list
    from pcbedge.families.qwen_vl.preprocess import load_rgb
    from pcbedge.families.qwen_vl.runner import QwenVlOnnxRunner

    chosen = read_list(find_data_root(None), "bench.txt")[:boards]
    images = [(load_rgb(b.test_path), load_rgb(b.template_path)) for b in chosen]
    ref = _fp32_runner(export_dir, manifest)
    fp32 = [_answer_pass(ref, test, template, tokens) for test, template in images]
    ref.close()
    del ref
    qnt = QwenVlOnnxRunner(stage, {**manifest, "pruning": None}, threads=None)
    emb, logit, prefix, exact = [], [], [], 0
    for (test, template), (er, lr, tr) in zip(images, fp32):
        eq, lq, tq = _answer_pass(qnt, test, template, tokens)
        emb.append(_rel_l2(eq, er))
        logit.append(_rel_l2(lq, lr))
        same = next((i for i, (a, c) in enumerate(zip(tr, tq)) if a != c), min(len(tr), len(tq)))
        prefix.append(same / max(len(tr), 1))
        exact += tr == tq
    qnt.close()
    n = len(chosen)
    return {"boards": n, "question": CALIBRATION_QUESTION, "max_new_tokens": tokens,
            "image_embeds_rel_l2": float(np.mean(emb)) if n else None,
            "first_logits_rel_l2": float(np.mean(logit)) if n else None,
            "token_prefix_agreement": float(np.mean(prefix)) if n else None,
            "answers_identical": f"{exact}/{n}"}


def _answer_pass(runner, test, template, tokens: int):
    """One board through ``runner``: its image embeddings, the prefill's logits and the greedy
    answer's tokens."""
    enc = runner.encode(runner.prepare(test, template))
    ids = runner.prompt(CALIBRATION_QUESTION, enc.prepared.inputs)
    embeds, pos, _, _ = runner.prefill_inputs(ids, enc, runner.pruning)
    logits = runner.sessions["decoder"].run(None, {
        "inputs_embeds": embeds, "position_ids": pos,
        "past": np.zeros(runner.kv_shape, np.float32)})[0]
    answer = runner.generate(ids, enc, max_new_tokens=tokens)["token_ids"]
    return np.concatenate(enc.outputs), logits, answer


def after_quantize(group: str, stage: Path, export_dir: Path, manifest: dict, profile, cal_set,
                   say) -> dict:
    drift = measure_drift(export_dir, stage, manifest)
    say(f"  drift vs fp32 after the {group} recipe ({drift['boards']} sample boards): image "
        f"embeds {drift['image_embeds_rel_l2']:.4f}, first logits "
        f"{drift['first_logits_rel_l2']:.4f} (rel. L2); greedy tokens agree "
        f"{100 * drift['token_prefix_agreement']:.0f}%, answers identical "
        f"{drift['answers_identical']}")
    if profile.quantization.score_bias_boards:
        say("  score bias correction: not applicable (no detection head in this family)")
    return {"drift_vs_fp32": drift}


def trt_axis_ranges(manifest: dict, profile, pruning) -> dict[str, tuple[int, int, int]]:
    """(min, opt, max) of the dynamic axes: patches and merged tokens of one image at the
    target's pixel budget, the prompt (visual tokens of board + template and a question), the
    KV cache up to the text limit."""
    from pcbedge.runtime.pruning import token_budget

    pre = manifest["preprocess"]
    merge = int(pre["merge_size"])
    f = int(pre["patch_size"]) * merge
    side = int(profile.shapes.input_size) // f * f
    tokens = min(int(pre["max_pixels"]), side * side) // (f * f)
    lo_tokens = max(1, int(pre["min_pixels"]) // (f * f))
    prompt_max = 2 * tokens + QUESTION_TOKENS
    opt_prompt = 2 * token_budget(tokens, pruning) + QUESTION_TOKENS
    text = int(profile.shapes.max_text_len)
    units = merge * merge
    b = profile.shapes.batch
    return {
        "n_patches": (units * lo_tokens, units * tokens, units * tokens),
        "n_tokens": (lo_tokens, tokens, tokens),
        "n_images_1": (2, 2, 2),
        "n_windows_1": (2, 2 + tokens // 4, 2 + tokens),
        "batch": (b, b, b),
        "seq": (1, opt_prompt, prompt_max),
        "past_seq": (0, opt_prompt + text // 2, prompt_max + text),
        "past_seq + seq": (1, opt_prompt + text // 2, prompt_max + text),
    }
