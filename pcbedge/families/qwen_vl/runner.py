"""A Qwen2-VL / Qwen2.5-VL bundle on ONNX Runtime: no torch, no transformers on this path.

prepare (images -> patches, :mod:`.preprocess`; the template, when given, is a second image) ->
encode (the ``vision`` graph image by image) -> answer (the checkpoint's chat template rendered
with the question, image tokens expanded, multimodal rotary positions on the full grid, optional
visual-token pruning by the family's token scores, ``embed`` + ``decoder`` prefill, greedy
decoding with the KV cache, the reply parsed by :mod:`.answer`).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pcbedge.bundle.manifest import safe_path
from pcbedge.errors import BundleError, TargetError
from pcbedge.families.qwen_vl import preprocess as qp
from pcbedge.families.qwen_vl.answer import BoxFrame, parse_reply
from pcbedge.families.qwen_vl.prompt import prompt_ids, prompt_text
from pcbedge.runtime import validate_max_new_tokens, validate_question
from pcbedge.runtime.protocol import Encoded, Prepared, Runner, ms_since
from pcbedge.runtime.pruning import TokenPruningConfig, as_pruning_config, token_budget
from pcbedge.runtime.sessions import open_bundle

PARSER = "qwen-vl-grounding-v1"
GRAPHS = ("vision", "embed", "decoder")


@dataclass
class Images:
    """Patches of the board (and template) images, their grids, (h, w) before/after resize."""

    pixel_values: np.ndarray
    grids: list[tuple[int, int, int]]
    original: list[tuple[int, int]]
    resized: list[tuple[int, int]]


def as_rgb(image) -> np.ndarray:
    """A path (decoded), an RGB uint8 array [H, W, 3], or a grayscale one [H, W] (stacked)."""
    if isinstance(image, (str, Path)):
        return qp.load_rgb(image)
    a = np.asarray(image)
    return np.repeat(a[..., None], 3, axis=-1) if a.ndim == 2 else a


def prepare_images(image, template, recipe: qp.ImageRecipe) -> Prepared:
    arrays = [as_rgb(im) for im in ([image] if template is None else [image, template])]
    patches, grids, resized = [], [], []
    for a in arrays:
        px, g = qp.preprocess_image(a, recipe)
        patches.append(px)
        grids.append(tuple(int(v) for v in g))
        resized.append((int(g[1]) * recipe.patch_size, int(g[2]) * recipe.patch_size))
    return Prepared(Images(np.concatenate(patches), grids, [a.shape[:2] for a in arrays],
                           resized))


def read_chat_template(bundle_dir: Path, manifest: dict) -> str:
    rel = (manifest.get("assets") or {}).get("chat_template")
    if not rel:
        raise BundleError(f"bundle {bundle_dir} ships no chat template",
                          fix="export it again with this pcbedge (the checkpoint's own chat "
                              "template goes into the bundle)")
    return safe_path(bundle_dir, rel).read_text(encoding="utf-8")


def open_runner(bundle_dir: Path, manifest: dict | None = None, **kwargs) -> "QwenVlOnnxRunner":
    """The family's ``runner`` role (pcbedge.families.base.Family.onnx_runner)."""
    return QwenVlOnnxRunner(bundle_dir, manifest, **kwargs)


class QwenVlOnnxRunner(Runner):
    """Runner of a Qwen-VL bundle (graphs ``vision``, ``embed``, ``decoder``)."""

    template_optional = True   # the template is a second image in the prompt, when given

    def __init__(self, bundle_dir: str | Path, manifest: dict | None = None, *,
                 threads: int | None = None, providers: list[str] | None = None,
                 pruning=None, verify: bool = True, sessions: bool = True):
        self.bundle_dir, self.manifest, self.tokenizer, self.ort = open_bundle(
            bundle_dir, manifest, graphs=GRAPHS, parser=PARSER, verify=verify, threads=threads,
            providers=providers, sessions=sessions)
        manifest, ans = self.manifest, self.manifest["answer"]
        self.pruning = as_pruning_config(manifest["pruning"] if pruning is None else pruning)
        self.chat_template = read_chat_template(self.bundle_dir, manifest)
        self.sessions, self.providers, self.threads = (self.ort.sessions, self.ort.providers,
                                                       self.ort.threads)
        self.recipe = qp.ImageRecipe.from_config(manifest["preprocess"])
        self.input_size = int(manifest["input_size"])
        self.vision_cfg = manifest["vision"]
        kv = manifest["kv_cache"]
        self.kv_shape = (kv["num_layers"], 2, 1, kv["num_heads"], 0, kv["head_dim"])
        self.image_token_id = int(ans["image_token_id"])
        self.eos = set(int(e) for e in ans["eos_token_ids"])
        self.system = ans.get("system_prompt")
        self.special_tokens = dict(ans.get("special_tokens") or {})
        self.defect_types = tuple(ans["defect_types"])
        self.box_coords = ans["box_coordinates"]
        # the manifest's names (each session's were checked against them when it opened)
        self.vision_inputs = [t["name"] for t in manifest["graphs"]["vision"]["inputs"]]

    def close(self) -> None:
        self.sessions.clear()

    # -- host side ----------------------------------------------------------------------------

    def prepare(self, image, template=None) -> Prepared:
        return prepare_images(image, template, self.recipe)

    def prompt(self, question: str, images: Images) -> list[int]:
        text = prompt_text(self.chat_template, question, len(images.grids), self.system,
                           self.special_tokens)
        return prompt_ids(self.tokenizer, text, images.grids, image_token_id=self.image_token_id,
                          merge=self.recipe.merge_size, where=str(self.bundle_dir))

    def vision_feeds(self, images: Images, grids=None, pixel_values=None) -> dict:
        """The vision graph's inputs for ``grids`` (default: all images): patches, rotary
        angles, segments (and windows)."""
        v = self.vision_cfg
        g = np.asarray(images.grids if grids is None else grids, np.int64).reshape(-1, 3)
        feeds = {"pixel_values": images.pixel_values if pixel_values is None else pixel_values,
                 "rotary": qp.vision_rotary(g, v["head_dim"], v["spatial_merge_size"],
                                            v.get("rotary_theta", 10000.0)),
                 "cu_seqlens": qp.cu_seqlens(g)}
        if v["windowed"]:
            idx, cu = qp.window_index(g, v["window_size"], v["patch_size"],
                                      v["spatial_merge_size"])
            feeds.update(window_index=idx, window_reverse=np.argsort(idx).astype(np.int64),
                         cu_window_seqlens=cu)
        return {k: feeds[k] for k in self.vision_inputs}

    def encode(self, prepared: Prepared) -> Encoded:
        """The vision graph image by image: it takes several images at once, but its masked
        attention spans all patches of a call (memory grows with their square)."""
        images: Images = prepared.inputs
        t0 = time.perf_counter()
        counts = [t * h * w for t, h, w in images.grids]
        starts = np.concatenate([[0], np.cumsum(counts)])
        embeds = [self.sessions["vision"].run(None, self.vision_feeds(
            images, [grid], images.pixel_values[starts[i]:starts[i + 1]]))[0]
            for i, grid in enumerate(images.grids)]
        return Encoded(embeds, prepared, ms_since(t0))

    def token_scores(self, embeds: list, method: str) -> list[np.ndarray]:
        """Per image, one score per visual token (higher = keep)."""
        if method == "feature_norm":
            return [np.linalg.norm(e, axis=-1) for e in embeds]
        if method == "template_diff":
            if len(embeds) != 2 or embeds[0].shape != embeds[1].shape:
                raise TargetError("pruning method 'template_diff' needs a template image of the "
                                  "board's size", fix="pass --template, or use 'feature_norm'")
            d = np.linalg.norm(embeds[0] - embeds[1], axis=-1)
            return [d, d]
        raise TargetError(f"pruning method {method!r} is not available for this bundle",
                          fix=f"use one of: none, {', '.join(self.manifest['token_scores'])}")

    def keep_mask(self, ids: list[int], embeds: list, cfg: TokenPruningConfig) -> np.ndarray:
        """Boolean [seq]: which prompt positions go to the decoder."""
        ids = np.asarray(ids)
        keep = np.ones(len(ids), bool)
        if not cfg.enabled:
            return keep
        where = np.flatnonzero(ids == self.image_token_id)
        start = 0
        for s in self.token_scores(embeds, cfg.method):
            n = len(s)
            k = token_budget(n, cfg)
            order = np.argsort(-np.where(np.isnan(s), -np.inf, s), kind="stable")
            keep[where[start:start + n][order[k:]]] = False
            start += n
        return keep

    # -- graphs -------------------------------------------------------------------------------

    def prefill_inputs(self, ids: list[int], enc: Encoded, cfg: TokenPruningConfig):
        """(inputs_embeds [1, kept, D], position_ids [3, 1, kept], next text position, keep)."""
        arr = np.asarray([ids], np.int64)
        embeds = self.sessions["embed"].run(None, {"input_ids": arr})[0]
        embeds[0, arr[0] == self.image_token_id] = np.concatenate(enc.outputs)
        pos = qp.rope_index(ids, enc.prepared.inputs.grids, image_token_id=self.image_token_id,
                            merge=self.recipe.merge_size)
        keep = self.keep_mask(ids, enc.outputs, cfg)
        return (np.ascontiguousarray(embeds[:, keep]),
                np.ascontiguousarray(pos[:, None, keep]), int(pos.max()) + 1, keep)

    def generate(self, ids: list[int], enc: Encoded, *, max_new_tokens: int = 64, pruning=None,
                 use_cache: bool = True) -> dict:
        """Greedy decoding; ``use_cache=False`` recomputes the whole sequence at every step."""
        validate_max_new_tokens(max_new_tokens)
        cfg = self.pruning if pruning is None else as_pruning_config(pruning)
        embeds, pos, nxt, keep = self.prefill_inputs(ids, enc, cfg)
        dec, emb = self.sessions["decoder"], self.sessions["embed"]
        past = np.zeros(self.kv_shape, np.float32)
        t0 = time.perf_counter()
        logits, present = dec.run(None, {"inputs_embeds": embeds, "position_ids": pos,
                                         "past": past})
        prefill_ms = ms_since(t0)
        t0 = time.perf_counter()
        out: list[int] = []
        while True:
            tok = int(np.argmax(logits[0]))
            out.append(tok)
            if tok in self.eos or len(out) >= max_new_tokens:
                break
            e = emb.run(None, {"input_ids": np.array([[tok]], np.int64)})[0]
            p = np.full((3, 1, 1), nxt, np.int64)
            nxt += 1
            if use_cache:
                logits, present = dec.run(None, {"inputs_embeds": e, "position_ids": p,
                                                 "past": present})
            else:
                embeds = np.concatenate([embeds, e], 1)
                pos = np.concatenate([pos, p], 2)
                logits, _ = dec.run(None, {"inputs_embeds": embeds, "position_ids": pos,
                                           "past": past})
        n_img = int((np.asarray(ids) == self.image_token_id).sum())
        return {"token_ids": out, "complete": out[-1] in self.eos, "prefill_ms": prefill_ms,
                "decode_ms": ms_since(t0), "prefill_len": int(keep.sum()),
                "visual_tokens_kept": int(keep.sum()) - (len(ids) - n_img),
                "visual_tokens_total": n_img, "pruning": cfg.to_dict()}

    def answer(self, encoded: Encoded, question: str, *, max_new_tokens: int = 64,
               pruning=None, use_cache: bool = True) -> dict:
        t_start = time.perf_counter()
        validate_question(question)
        images: Images = encoded.prepared.inputs
        ids = self.prompt(question, images)
        gen = self.generate(ids, encoded, max_new_tokens=max_new_tokens, pruning=pruning,
                            use_cache=use_cache)
        ans = reply_answer(self.tokenizer, gen["token_ids"], self.eos, images, self.box_coords,
                           self.defect_types, gen["complete"])
        ans["latency_ms"] = {"preprocess": encoded.prepared.preprocess_ms,
                             "vision": encoded.vision_ms, "prefill": gen["prefill_ms"],
                             "decode": gen["decode_ms"],
                             "total": round(encoded.vision_ms + ms_since(t_start), 3)}
        ans["info"] = {"visual_tokens_kept": gen["visual_tokens_kept"],
                       "visual_tokens_total": gen["visual_tokens_total"],
                       "prefill_tokens": gen["prefill_len"], "pruning": gen["pruning"],
                       "new_tokens": len(gen["token_ids"]), "use_cache": use_cache,
                       "engine": "onnxruntime", "providers": self.providers}
        return ans


def reply_answer(tokenizer, token_ids: list[int], eos: set, images: Images, coords: str,
                 defect_types: tuple, complete: bool) -> dict:
    """The answer JSON of a generated reply (boxes mapped to the board's original pixels)."""
    ids = [t for t in token_ids if t not in eos]
    frame = BoxFrame(coords, images.resized[0], images.original[0])
    ans = parse_reply(tokenizer.decode(ids, skip_special_tokens=False), frame, defect_types,
                      complete=complete)
    ans["raw"] = tokenizer.decode(token_ids, skip_special_tokens=False)
    ans["token_ids"] = list(token_ids)
    return ans
