"""The reference PCB VLM's bundle on ONNX Runtime: no torch anywhere on this path.

prepare (``load_pair`` at the manifest's input size: aligned test, template, |difference|) ->
``vision`` graph (visual tokens, region proposals, token scores) -> optional visual-token pruning
-> two decoder passes (``decoder_prefill`` then cached ``decoder_step`` calls, program.py): the
question's program, and the board pass (once per board) whose pointers at proposals are every
reported box (grounded by construction) -> the regions the program admits -> answer JSON with
boxes in original pixels.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from pcbedge.data.preprocess import load_pair, prepare_pair
from pcbedge.errors import BundleError, InputImageError
from pcbedge.families.pcbvlm.answer import board_budget, compose, run_board, run_program
from pcbedge.families.pcbvlm.program import program_visual_tokens
from pcbedge.families.pcbvlm.tokenizer import encode_question, encode_question_numbers
from pcbedge.runtime import validate_max_new_tokens, validate_question
from pcbedge.runtime.protocol import Encoded, Prepared, Runner, ms_since
from pcbedge.runtime.pruning import TokenPruningConfig, as_pruning_config, select_tokens
from pcbedge.runtime.sessions import open_bundle

PARSER = "pcbvlm-pointer-v3"
GRAPHS = ("vision", "decoder_prefill", "decoder_step")


def prepare_board(image, template, size: int) -> Prepared:
    """Paths (decoded, aligned) or uint8 grayscale arrays of one size -> Prepared [3, S, S]."""
    if isinstance(image, np.ndarray) and isinstance(template, np.ndarray):
        if image.shape != template.shape:
            raise InputImageError(f"template {template.shape} and board {image.shape} differ in "
                                  "size", fix="pass aligned pairs of one size")
        x, meta = prepare_pair(image, template, size, ("<array>", "<array>"))
    else:
        x, meta = load_pair(image, template, size)
    return Prepared(x, meta)


def as_prepared(prepared) -> Prepared:
    """A Prepared, or a bare preprocessed array [3, H, W] (no geometry: boxes in input pixels)."""
    return prepared if isinstance(prepared, Prepared) else Prepared(prepared)


def check_input(x, multiple: int) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    x = x[None] if x.ndim == 3 else x
    if x.ndim != 4 or x.shape[:2] != (1, 3) or x.shape[2] % multiple or x.shape[3] % multiple:
        raise InputImageError(f"model input has shape {tuple(x.shape)}, expected [3, H, W] "
                              f"with H and W multiples of {multiple}",
                              fix="prepare it with runner.prepare(image, template)")
    return np.ascontiguousarray(x)


def open_runner(bundle_dir: Path, manifest: dict | None = None, **kwargs) -> "PcbVlmOnnxRunner":
    """The family's ``runner`` role (pcbedge.families.base.Family.onnx_runner)."""
    return PcbVlmOnnxRunner(bundle_dir, manifest, **kwargs)


class PcbVlmOnnxRunner(Runner):
    """ONNX Runtime runner of a ``pcbvlm`` bundle; sessions are opened once."""

    def __init__(self, bundle_dir: str | Path, manifest: dict | None = None, *,
                 threads: int | None = None, providers: list[str] | None = None,
                 pruning=None, verify: bool = True):
        self.bundle_dir, self.manifest, self.tokenizer, self.ort = open_bundle(
            bundle_dir, manifest, graphs=GRAPHS, parser=PARSER, verify=verify, threads=threads,
            providers=providers)
        manifest = self.manifest
        self.grammar = manifest["answer"]["grammar"]
        self.input_size = int(manifest["input_size"])
        self.size_multiple = int(manifest.get("size_multiple", 32))
        self.max_text_len = int(manifest["max_text_len"])
        self.max_question_tokens = int(manifest["max_question_tokens"])
        self.token_scores = dict(manifest["token_scores"])
        self.pruning = as_pruning_config(manifest["pruning"] if pruning is None else pruning)
        self.sessions, self.providers, self.threads = (self.ort.sessions, self.ort.providers,
                                                       self.ort.threads)

    def close(self) -> None:
        self.sessions.clear()

    # -- stages -------------------------------------------------------------------------------

    def encode_question(self, question: str) -> list[int]:
        return encode_question(self.tokenizer, validate_question(question),
                               self.max_question_tokens)

    def prepare(self, image, template=None) -> Prepared:
        self.check_template(template)
        return prepare_board(image, template, self.input_size)

    def encode(self, prepared) -> Encoded:
        """The vision graph on one prepared board (or a bare input array [3, H, W])."""
        prepared = as_prepared(prepared)
        x = check_input(prepared.inputs, self.size_multiple)
        t0 = time.perf_counter()
        out = self.sessions["vision"].run(None, {"pixel_values": x})
        return Encoded(dict(zip(self.ort.output_names("vision"), out)), prepared, ms_since(t0))

    def keep_indices(self, enc: Encoded, pruning: TokenPruningConfig) -> np.ndarray | None:
        """Visual tokens kept by ``pruning`` (ascending), or None to keep them all."""
        if not pruning.enabled:
            return None
        name = self.token_scores.get(pruning.method)
        if name not in enc.outputs:
            raise BundleError(f"bundle {self.bundle_dir} has no token score output for pruning "
                              f"method {pruning.method!r}",
                              fix=f"use one of: none, {', '.join(self.token_scores)}")
        return select_tokens(enc.outputs[name][0], pruning)

    def answer(self, encoded: Encoded, question: str, *, max_new_tokens: int = 64,
               pruning=None) -> dict:
        """Answer ``question`` from the vision outputs of :meth:`encode`."""
        t_start = time.perf_counter()
        validate_max_new_tokens(max_new_tokens)
        ids, numbers = encode_question_numbers(self.tokenizer, validate_question(question),
                                               self.max_question_tokens)
        cfg = self.pruning if pruning is None else as_pruning_config(pruning)
        out_v = encoded.outputs
        vis, reg = out_v["visual_tokens"], out_v["region_tokens"]
        n_total = int(vis.shape[1])
        timing = {"prefill": 0.0, "decode": 0.0}
        few = program_visual_tokens(n_total, self.grammar["program"].get("visual_tokens", 8))
        prefill, step = self._passes(np.ascontiguousarray(vis[:, few]), reg, timing)
        pstate, _ = run_program(self.grammar, prefill, step, ids, len(numbers),
                                self.max_text_len, max_new_tokens)
        keep = self.keep_indices(encoded, cfg)
        if keep is not None:
            vis = np.ascontiguousarray(vis[:, keep])
        prefill, step = self._passes(vis, reg, timing)
        key = ("board", repr(sorted(cfg.to_dict().items())))
        if key not in encoded.cache:     # one board pass per board, whatever the question
            canon = encode_question(self.tokenizer, self.grammar["canonical_question"],
                                    self.max_question_tokens)
            encoded.cache[key] = run_board(self.grammar, prefill, step, canon,
                                           out_v["region_scores"][0], out_v["region_boxes"][0],
                                           self.max_text_len, board_budget(self.grammar))[0]
        meta = encoded.meta
        to_orig = meta.to_original if meta is not None else (lambda b: list(b))
        quality = meta.quality_dict() if meta is not None else None
        size = (meta.orig_w, meta.orig_h) if meta is not None else tuple(
            int(v) for v in encoded.prepared.inputs.shape[-1:-3:-1])
        ans, out = compose(self.grammar, pstate, numbers, encoded.cache[key],
                           out_v["region_boxes"][0], to_orig, size, quality, max_new_tokens)
        prefill_ms, decode_ms = timing["prefill"], timing["decode"]
        ans["raw"] = self.tokenizer.decode(out, skip_special_tokens=False)
        ans["token_ids"] = out
        ans["latency_ms"] = {"preprocess": encoded.prepared.preprocess_ms,
                             "vision": encoded.vision_ms, "prefill": prefill_ms,
                             "decode": decode_ms,
                             "total": round(encoded.vision_ms + ms_since(t_start), 3)}
        ans["info"] = {"visual_tokens_kept": int(vis.shape[1]), "visual_tokens_total": n_total,
                       "pruning": cfg.to_dict(), "new_tokens": len(out),
                       "engine": "onnxruntime", "providers": self.providers}
        return ans

    def _passes(self, vis, reg, timing: dict):
        """prefill / step callables over the decoder graphs, timing into ``timing``."""
        pre, stp = self.sessions["decoder_prefill"], self.sessions["decoder_step"]

        def prefill(ids):
            t0 = time.perf_counter()
            logits, past = pre.run(["logits", "present"], {
                "visual_tokens": vis, "region_tokens": reg,
                "input_ids": np.asarray([ids], dtype=np.int64)})
            timing["prefill"] += ms_since(t0)
            return logits[0], past

        def step(tok, pos, past):
            t0 = time.perf_counter()
            logits, past = stp.run(["logits", "present"], {
                "input_ids": np.array([[tok]], dtype=np.int64),
                "positions": np.array([[pos]], dtype=np.int64),
                "region_tokens": reg, "past": past})
            timing["decode"] += ms_since(t0)
            return logits[0], past
        return prefill, step
