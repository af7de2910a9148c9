"""Parity of a Qwen2-VL / Qwen2.5-VL export with PyTorch, run on the staged bundle.

The same rules as :mod:`pcbedge.families.pcbvlm.parity`: each graph gets PyTorch's upstream outputs, an
output passes where ``|onnx - torch| <= atol + rtol * |torch|``. Checked: the runner's numpy
patches and multimodal positions against transformers' own, the vision graph (one image and
test + template at once) at every size, the embedding, the decoder prefill and two cached steps,
and the whole greedy loop (the same token ids as transformers' ``generate``).
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from pcbedge.errors import ExportError
from pcbedge.export.parity import ParityErrors, check_tolerances

log = logging.getLogger(__name__)

QUESTIONS = ("where are the defects?", "how many shorts are there?")
ANSWER_TOKENS = 8
DEFAULT_BOARDS = 1
RELEASES_MODEL = True   # check_parity takes a ModelHandle (pcbedge.families.base.Family)


def random_board(h: int, w: int, seed: int) -> np.ndarray:
    """A board-like uint8 RGB image: blocky traces with one changed patch."""
    rng = np.random.default_rng(seed)
    img = (rng.random((h // 7 + 1, w // 7 + 1, 3)) * 255).astype(np.uint8)
    img = img.repeat(7, 0).repeat(7, 1)[:h, :w]
    img[h // 3:h // 3 + 8, w // 3:w // 3 + 8] = 255
    return np.ascontiguousarray(img)


def _board_images(count: int) -> tuple[list, dict]:
    from pcbedge.data.deeppcb import find_data_root, read_list
    from pcbedge.errors import PcbEdgeError
    from pcbedge.families.qwen_vl.preprocess import load_rgb

    if count <= 0:
        return [], {"source": "random", "reason": "check_boards=0", "count": 0}
    try:
        boards = read_list(find_data_root(None), "bench.txt")[:count]
        pairs = [(b.id, load_rgb(b.test_path), load_rgb(b.template_path)) for b in boards]
    except PcbEdgeError as e:
        log.warning("embedded sample not usable (%s); parity runs on random images only", e)
        return [], {"source": "random", "reason": f"embedded sample not usable: {e}", "count": 0}
    return pairs, {"source": "pcbedge/data/sample", "count": len(pairs),
                   "ids": [p[0] for p in pairs]}


def _torch_side(family, model, host, prepared, question: str, case: str, rope: dict) -> dict:
    """PyTorch's outputs for one input: the vision tower, the embedding of the prompt, and the
    decoder's prefill and two cached steps, each step fed PyTorch's own previous outputs (the
    feeds are kept: the ONNX phase runs exactly these). The multimodal positions are checked
    against transformers' ``get_rope_index`` here."""
    import torch

    from pcbedge.families.qwen_vl.preprocess import rope_index

    images = prepared.inputs
    grids = np.asarray(images.grids, np.int64)
    ref = family.reference(model, "vision", {"pixel_values": images.pixel_values,
                                             "grid_thw": grids})["image_embeds"]
    prompt_ids = host.prompt(question, images)
    ids = np.asarray([prompt_ids], np.int64)
    ref_e = family.reference(model, "embed", {"input_ids": ids})["inputs_embeds"]
    with torch.no_grad():
        ref_pos, _ = model.model.get_rope_index(torch.from_numpy(ids),
                                                image_grid_thw=torch.from_numpy(grids))
    pos = rope_index(prompt_ids, images.grids, image_token_id=host.image_token_id,
                     merge=host.recipe.merge_size)
    rope["checked"] += 1
    if not np.array_equal(pos, ref_pos.numpy()[:, 0]):
        rope["mismatches"].append(case)
    embeds = ref_e.copy()
    embeds[0, ids[0] == host.image_token_id] = ref
    feeds = {"inputs_embeds": embeds, "position_ids": pos[:, None].copy(),
             "past": np.zeros(host.kv_shape, np.float32)}
    nxt = int(pos.max()) + 1
    steps = []
    for step in range(3):   # prefill, then two cached steps
        r = family.reference(model, "decoder", feeds)
        steps.append((feeds, r))
        tok = np.asarray([[int(r["logits"][0].argmax())]], np.int64)
        feeds = {"inputs_embeds": family.reference(model, "embed", {"input_ids": tok})[
                     "inputs_embeds"],
                 "position_ids": np.full((3, 1, 1), nxt + step, np.int64), "past": r["present"]}
    return {"case": case, "prepared": prepared, "vision": ref, "ids": ids, "embed": ref_e,
            "steps": steps}


def _onnx_side(runner, rec: dict, errors: ParityErrors) -> None:
    """The bundle's graphs on the inputs PyTorch saw, against its outputs."""
    case, images = rec["case"], rec["prepared"].inputs
    enc = runner.encode(rec["prepared"])     # image by image, as the runner answers
    errors.add("vision", "image_embeds", np.concatenate(enc.outputs), rec["vision"], case)
    if len(images.grids) > 1:         # and all images in one call (block-diagonal mask)
        both = runner.sessions["vision"].run(None, runner.vision_feeds(images))[0]
        errors.add("vision", "image_embeds", both, rec["vision"], f"{case} (one call)")
    got_e = runner.sessions["embed"].run(None, {"input_ids": rec["ids"]})[0]
    errors.add("embed", "inputs_embeds", got_e, rec["embed"], case)
    for step, (feeds, r) in enumerate(rec["steps"]):
        logits, present = runner.sessions["decoder"].run(None, feeds)
        errors.add("decoder", "logits", logits, r["logits"], f"{case} step {step}")
        errors.add("decoder", "present", present, r["present"], f"{case} step {step}")


def _check_patches(runner, prepared, images, case: str, errors: ParityErrors,
                   report: dict) -> None:
    """The runner's numpy patches and grids against transformers' Qwen2VLImageProcessor."""
    from transformers import Qwen2VLImageProcessor

    r = runner.recipe
    proc = Qwen2VLImageProcessor(min_pixels=r.min_pixels, max_pixels=r.max_pixels,
                                 patch_size=r.patch_size, merge_size=r.merge_size,
                                 temporal_patch_size=r.temporal_patch_size,
                                 image_mean=list(r.image_mean), image_std=list(r.image_std),
                                 rescale_factor=r.rescale_factor)
    out = proc(images=list(images), return_tensors="np")
    report["checked"] += 1
    mine = prepared.inputs
    if out["image_grid_thw"].tolist() != [list(g) for g in mine.grids]:
        errors.failures.append(f"image grids at {case}: {[list(g) for g in mine.grids]} vs "
                               f"transformers {out['image_grid_thw'].tolist()}")
        return
    errors.add("preprocess", "pixel_values", mine.pixel_values, out["pixel_values"], case)
    report["max_abs"] = errors.graphs["preprocess"]["pixel_values"]["max_abs"]


def check_parity(family, model, bundle_dir: Path, manifest: dict, *, sizes=None,
                 boards: int | None = None, atol: float = 1e-3, rtol: float = 1e-3) -> dict:
    """The manifest's ``parity`` block, or ExportError. Two phases: PyTorch's outputs and
    greedy answers first, then (the model released when ``model`` is a
    :class:`~pcbedge.export.graphs.ModelHandle`) the bundle's sessions on the same inputs."""
    import gc

    from pcbedge.export.graphs import ModelHandle
    from pcbedge.families.qwen_vl.export import generate_reference
    from pcbedge.families.qwen_vl.runner import QwenVlOnnxRunner

    atol, rtol = check_tolerances(atol, rtol)
    side = int(manifest["input_size"])
    sizes = [tuple(int(v) for v in s) for s in (sizes or [(side, side), (side // 2, side)])]
    bad = [s for s in sizes if len(s) != 2 or min(s) < 28]
    if bad:
        raise ExportError(f"parity sizes {bad} are not (height, width) pairs of at least 28 px",
                          fix="use sizes such as [(448, 448), (224, 448)]")
    release = isinstance(model, ModelHandle)
    if release:
        model = model.take()
    host = QwenVlOnnxRunner(bundle_dir, manifest, pruning={"method": "none"}, sessions=False)
    errors = ParityErrors(atol, rtol)
    rope = {"checked": 0, "mismatches": []}
    inputs = []
    for i, (h, w) in enumerate(sizes):
        img, tmpl = random_board(h, w, seed=i), random_board(h, w, seed=100 + i)
        inputs += [(f"random {h}x{w}", img, None), (f"random {h}x{w} + template", img, tmpl)]
    pairs, board_source = _board_images(DEFAULT_BOARDS if boards is None else int(boards))
    inputs += [(f"board {bid}", test, tmpl) for bid, test, tmpl in pairs]
    patches = {"checked": 0, "max_abs": 0.0}
    records, answers_ref = [], []
    for case, img, tmpl in inputs:                      # phase 1: PyTorch
        prepared = host.prepare(img, tmpl)
        _check_patches(host, prepared, [img] if tmpl is None else [img, tmpl], case, errors,
                       patches)
        records.append(_torch_side(family, model, host, prepared, QUESTIONS[0], case, rope))
    for rec in records[:2]:
        for q in QUESTIONS:
            ids = host.prompt(q, rec["prepared"].inputs)
            answers_ref.append((rec, q, ids, generate_reference(model, ids,
                                                                rec["prepared"].inputs,
                                                                ANSWER_TOKENS)))
    if release:
        del model
        gc.collect()
    runner = QwenVlOnnxRunner(bundle_dir, manifest, providers=["CPUExecutionProvider"],
                              pruning={"method": "none"})
    for rec in records:                                 # phase 2: ONNX Runtime
        _onnx_side(runner, rec, errors)
    checked, mismatches = 0, []
    for rec, q, ids, ref in answers_ref:
        enc = runner.encode(rec["prepared"])
        got = runner.generate(ids, enc, max_new_tokens=ANSWER_TOKENS)["token_ids"]
        checked += 1
        if got != ref:
            mismatches.append({"input": rec["case"], "question": q, "onnx": got, "torch": ref})
    runner.close()
    answers = {"checked": checked, "identical": checked - len(mismatches),
               "max_new_tokens": ANSWER_TOKENS, "questions": list(QUESTIONS),
               "mismatches": mismatches[:5]}
    report = {"atol": atol, "rtol": rtol, "sizes": [list(s) for s in sizes],
              "boards": board_source, "graphs": errors.graphs, "rope_index": rope,
              "patches": patches,
              "answers": answers}
    failures = errors.failures + [f"multimodal positions differ from get_rope_index at {c}"
                                  for c in rope["mismatches"]]
    failures += [f"answer to {m['question']!r} on {m['input']}: onnx {m['onnx']} vs torch "
                 f"{m['torch']}" for m in mismatches[:2]]
    report["passed"] = not failures
    if failures:
        raise ExportError("the exported graphs disagree with PyTorch: " + "; ".join(failures[:4]),
                          fix="see the parity section of docs/export.md; a tolerance that is "
                              "too tight can be raised with atol=/rtol=")
    return report
