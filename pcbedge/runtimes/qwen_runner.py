"""Answer questions with a Qwen2-VL / Qwen2.5-VL bundle on ONNX Runtime: no torch, no
transformers on this path (numpy, tokenizers, PIL, onnxruntime).

Stages of :meth:`QwenRunner.ask`: images -> patches (:mod:`qwen_preprocess`) -> ``vision``
graph -> chat prompt with the image tokens in place -> multimodal rotary positions on the full
grid -> optional visual-token pruning (the pruned tokens' columns are removed, the kept ones keep
their positions) -> ``embed`` + ``decoder`` prefill -> greedy decoding with the KV cache (or by
full recompute, ``use_cache=False``) -> answer JSON (:mod:`qwen_answer`).
Everything comes from the manifest (``runner: qwen2-vl``); nothing branches on the family name.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pcbedge.errors import BundleError, InputImageError, QuestionError, TargetError
from pcbedge.runtimes import qwen_preprocess as qp
from pcbedge.runtimes import validate_max_new_tokens, validate_question
from pcbedge.runtimes.onnx_runner import OnnxRunner, _check_arch
from pcbedge.runtimes.pruning import TokenPruningConfig, as_pruning_config, token_budget
from pcbedge.runtimes.qwen_answer import SPECIAL_RE, BoxFrame, parse_reply

PARSERS = {"qwen-vl-grounding-v1": parse_reply}
IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"


def _ms(t0: float) -> float:
    return round((time.perf_counter() - t0) * 1000.0, 3)


@dataclass
class Prompt:
    """One question with its images, ready for the graphs: token ids (image tokens expanded),
    patches of all images, their grids, and (height, width) before and after the resize."""

    input_ids: list[int]
    pixel_values: np.ndarray
    grids: list[tuple[int, int, int]]
    original: list[tuple[int, int]]
    resized: list[tuple[int, int]]
    image_embeds: list[np.ndarray] = field(default_factory=list)
    vision_ms: float = 0.0


class QwenRunner(OnnxRunner):
    """Runner of ``runner: qwen2-vl`` bundles (graphs ``vision``, ``embed``, ``decoder``).
    Shares the session, provider, thread and hash handling of :class:`OnnxRunner`."""

    template_optional = True   # the template is a second image in the prompt, when given

    def _setup(self, bundle_dir: Path, manifest: dict, threads, providers, pruning) -> None:
        ans = manifest["answer"]
        if ans.get("parser") not in PARSERS:
            raise BundleError(f"bundle {bundle_dir} uses the answer parser "
                              f"{ans.get('parser')!r}, unknown to this pcbedge "
                              f"(known: {sorted(PARSERS)})", fix="upgrade pcbedge")
        self.parse = PARSERS[ans["parser"]]
        _check_arch(bundle_dir, manifest)
        self._init_sessions(bundle_dir, manifest, threads, providers, pruning)
        self.recipe = qp.ImageRecipe.from_config(manifest["preprocess"])
        self.vision_cfg = manifest["vision"]
        kv = manifest["kv_cache"]
        self.kv_shape = (kv["num_layers"], 2, 1, kv["num_heads"], 0, kv["head_dim"])
        self.image_token_id = int(ans["image_token_id"])
        self.eos = set(int(e) for e in ans["eos_token_ids"])
        self.system = ans.get("system")
        self.defect_types = tuple(ans["defect_types"])
        self.box_coords = ans["box_coordinates"]
        self.vision_inputs = [i.name for i in self.sessions["vision"].get_inputs()]

    # -- host side ----------------------------------------------------------------------------

    def chat_text(self, question: str, n_images: int) -> str:
        """Qwen's chat template for one user turn: the images first, then the question."""
        sys = f"<|im_start|>system\n{self.system}<|im_end|>\n" if self.system else ""
        return (f"{sys}<|im_start|>user\n{IMAGE * n_images}{question}<|im_end|>\n"
                "<|im_start|>assistant\n")

    def build_prompt(self, image, question: str, template=None) -> Prompt:
        """Preprocess the image (and the template, as a second image) and tokenize the prompt.
        Images are paths or uint8 RGB arrays [H, W, 3]."""
        validate_question(question)
        special = SPECIAL_RE.search(question)
        if special:   # it would add image slots or end the turn inside the prompt
            raise QuestionError(f"the question holds the special token {special.group(0)!r}",
                                fix="ask in plain text; the runner adds the chat and image "
                                    "tokens itself")
        images = [image] if template is None else [image, template]
        arrays = [qp.load_rgb(im) if isinstance(im, (str, Path)) else np.asarray(im)
                  for im in images]
        patches, grids, resized = [], [], []
        for a in arrays:
            px, g = qp.preprocess_image(a, self.recipe)
            patches.append(px)
            grids.append(tuple(int(v) for v in g))
            resized.append((int(g[1]) * self.recipe.patch_size, int(g[2]) * self.recipe.patch_size))
        ids = self.tokenizer.encode(self.chat_text(question, len(arrays)),
                                    add_special_tokens=False).ids
        unit = self.recipe.merge_size ** 2
        out, k = [], 0
        for t in ids:   # each image's single placeholder becomes one token per merged patch
            if t == self.image_token_id:
                t_, h, w = grids[k]
                out.extend([t] * (t_ * h * w // unit))
                k += 1
            else:
                out.append(t)
        if k != len(arrays):
            raise BundleError(f"the tokenizer of {self.bundle_dir} does not keep <|image_pad|> "
                              "as one token", fix="export the bundle with the model's own "
                                                  "tokenizer.json")
        return Prompt(out, np.concatenate(patches), grids,
                      [a.shape[:2] for a in arrays], resized)

    def encode_images(self, prompt: Prompt) -> Prompt:
        """Run the vision graph image by image: the graph takes several images at once, but
        its masked attention spans all patches of a call (memory grows with their square)."""
        t0 = time.perf_counter()
        counts = [t * h * w for t, h, w in prompt.grids]
        starts = np.concatenate([[0], np.cumsum(counts)])
        prompt.image_embeds = [
            self.sessions["vision"].run(None, self.vision_feeds(
                prompt, [grid], prompt.pixel_values[starts[i]:starts[i + 1]]))[0]
            for i, grid in enumerate(prompt.grids)]
        prompt.vision_ms = _ms(t0)
        return prompt

    def vision_feeds(self, prompt: Prompt, grids=None, pixel_values=None) -> dict:
        """The vision graph's inputs for ``grids`` (default: all images of the prompt):
        patches, rotary angles, segments (and windows)."""
        v = self.vision_cfg
        g = np.asarray(prompt.grids if grids is None else grids, np.int64).reshape(-1, 3)
        feeds = {"pixel_values": prompt.pixel_values if pixel_values is None else pixel_values,
                 "rotary": qp.vision_rotary(g, v["head_dim"], v["spatial_merge_size"],
                                            v.get("rotary_theta", 10000.0)),
                 "cu_seqlens": qp.cu_seqlens(g)}
        if v["windowed"]:
            idx, cu = qp.window_index(g, v["window_size"], v["patch_size"],
                                      v["spatial_merge_size"])
            feeds.update(window_index=idx, window_reverse=np.argsort(idx).astype(np.int64),
                         cu_window_seqlens=cu)
        return {k: feeds[k] for k in self.vision_inputs}

    def positions(self, prompt: Prompt) -> np.ndarray:
        """Multimodal rotary positions [3, seq] of the full (unpruned) prompt."""
        return qp.rope_index(prompt.input_ids, prompt.grids, image_token_id=self.image_token_id,
                             merge=self.recipe.merge_size)

    def token_scores(self, prompt: Prompt, method: str) -> list[np.ndarray]:
        """Per image, one score per visual token (higher = keep)."""
        embeds = prompt.image_embeds
        if method == "feature_norm":
            return [np.linalg.norm(e, axis=-1) for e in embeds]
        if method == "template_diff":
            if len(embeds) != 2 or embeds[0].shape != embeds[1].shape:
                raise TargetError("pruning method 'template_diff' needs a template image of the "
                                  "board's size", fix="pass --template, or use 'feature_norm'")
            d = np.linalg.norm(embeds[0] - embeds[1], axis=-1)
            return [d, d]
        raise TargetError(f"pruning method {method!r} is not available for this bundle",
                          fix=f"use one of: none, {', '.join(self.token_scores_of)}")

    def keep_mask(self, prompt: Prompt, cfg: TokenPruningConfig) -> np.ndarray:
        """Boolean [seq]: which prompt positions go to the decoder."""
        ids = np.asarray(prompt.input_ids)
        keep = np.ones(len(ids), bool)
        if not cfg.enabled:
            return keep
        where = np.flatnonzero(ids == self.image_token_id)
        start = 0
        for s in self.token_scores(prompt, cfg.method):
            n = len(s)
            k = token_budget(n, cfg)
            order = np.argsort(-np.where(np.isnan(s), -np.inf, s), kind="stable")
            keep[where[start:start + n][order[k:]]] = False
            start += n
        return keep

    @property
    def token_scores_of(self) -> list[str]:
        return list(self.manifest["token_scores"])

    # -- graphs -------------------------------------------------------------------------------

    def prefill_inputs(self, prompt: Prompt, cfg: TokenPruningConfig):
        """(inputs_embeds [1, kept, D], position_ids [3, 1, kept], next text position)."""
        ids = np.asarray([prompt.input_ids], np.int64)
        embeds = self.sessions["embed"].run(None, {"input_ids": ids})[0]
        img = np.flatnonzero(ids[0] == self.image_token_id)
        embeds[0, img] = np.concatenate(prompt.image_embeds)
        pos = self.positions(prompt)
        keep = self.keep_mask(prompt, cfg)
        return (np.ascontiguousarray(embeds[:, keep]),
                np.ascontiguousarray(pos[:, None, keep]), int(pos.max()) + 1, keep)

    def generate(self, prompt: Prompt, *, max_new_tokens: int = 64, pruning=None,
                 use_cache: bool = True) -> dict:
        """Greedy decoding; ``use_cache=False`` recomputes the whole sequence at every step."""
        validate_max_new_tokens(max_new_tokens)
        cfg = self.pruning if pruning is None else as_pruning_config(pruning)
        embeds, pos, nxt, keep = self.prefill_inputs(prompt, cfg)
        dec, emb = self.sessions["decoder"], self.sessions["embed"]
        past = np.zeros(self.kv_shape, np.float32)
        t0 = time.perf_counter()
        logits, present = dec.run(None, {"inputs_embeds": embeds, "position_ids": pos,
                                         "past": past})
        prefill_ms = _ms(t0)
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
        return {"token_ids": out, "complete": out[-1] in self.eos, "prefill_ms": prefill_ms,
                "decode_ms": _ms(t0), "prefill_len": int(keep.sum()),
                "visual_tokens_kept": int(keep.sum()) - int(
                    (np.asarray(prompt.input_ids) != self.image_token_id).sum()),
                "visual_tokens_total": int(
                    (np.asarray(prompt.input_ids) == self.image_token_id).sum()),
                "pruning": cfg.to_dict()}

    def ask(self, test_path, template_path=None, question: str = "", *,
            max_new_tokens: int = 64, pruning=None, use_cache: bool = True) -> dict:
        """Answer ``question`` about a board image (and optionally its golden template)."""
        t_start = time.perf_counter()
        validate_question(question)
        prompt = self.build_prompt(test_path, question, template_path)
        pre_ms = _ms(t_start)
        self.encode_images(prompt)
        gen = self.generate(prompt, max_new_tokens=max_new_tokens, pruning=pruning,
                            use_cache=use_cache)
        ids = [t for t in gen["token_ids"] if t not in self.eos]
        raw = self.tokenizer.decode(gen["token_ids"], skip_special_tokens=False)
        frame = BoxFrame(self.box_coords, prompt.resized[0], prompt.original[0])
        ans = self.parse(self.tokenizer.decode(ids, skip_special_tokens=False), frame,
                         self.defect_types, complete=gen["complete"])
        ans["raw"] = raw
        ans["token_ids"] = gen["token_ids"]
        ans["latency_ms"] = {"preprocess": pre_ms, "vision": prompt.vision_ms,
                             "prefill": gen["prefill_ms"], "decode": gen["decode_ms"],
                             "total": _ms(t_start)}
        ans["info"] = {"visual_tokens_kept": gen["visual_tokens_kept"],
                       "visual_tokens_total": gen["visual_tokens_total"],
                       "prefill_tokens": gen["prefill_len"], "pruning": gen["pruning"],
                       "new_tokens": len(gen["token_ids"]), "use_cache": use_cache,
                       "engine": "onnxruntime", "providers": self.providers}
        return ans

    def ask_array(self, *args, **kwargs):
        """Not available: it takes the stacked (test, template, diff) input of the default
        runner, which a Qwen-VL bundle does not read."""
        raise InputImageError("ask_array/encode/answer_encoded take the default runner's "
                              "stacked input, which a Qwen-VL bundle does not use",
                              fix="call ask() with image paths or uint8 RGB arrays, or "
                                  "build_prompt + encode_images + generate")

    encode = answer_encoded = ask_array
