"""Answer questions with a bundle on ONNX Runtime: no torch anywhere on this path.

Stages of :meth:`OnnxRunner.ask`: preprocess (``load_pair`` at the manifest's input size) ->
vision graph -> optional visual-token pruning -> decoder prefill -> cached decode steps with
grammar-constrained greedy decoding -> answer JSON with boxes in original pixels.
Everything the runner needs comes from the manifest; it never branches on the family name.
"""
from __future__ import annotations

import platform
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer

from pcbedge.data.preprocess import PairMeta
from pcbedge.errors import BundleError, HardwareMismatchError, InputImageError, TargetError
from pcbedge.export.manifest import read_manifest, safe_path, verify_files
from pcbedge.models.pcbvlm.grammar import DecodeState, build_answer
from pcbedge.models.pcbvlm.tokenizer import encode_question
from pcbedge.runtimes import validate_max_new_tokens, validate_question
from pcbedge.runtimes.base import AskMixin
from pcbedge.runtimes.pruning import TokenPruningConfig, as_pruning_config, select_tokens


@dataclass(frozen=True)
class AnswerParser:
    """How an answer language is decoded: constrained-decoding state, renderer, question ids."""

    state: type
    build: object
    encode_question: object


# keyed by the manifest's answer.parser, so a new answer language is data, not a code branch
PARSERS = {"pcbvlm-pointer-v2": AnswerParser(DecodeState, build_answer, encode_question)}


@dataclass(frozen=True)
class EncodedImage:
    """Vision outputs of one image (batch 1), reusable for many questions."""

    outputs: dict
    vision_ms: float


def _ms(t0: float) -> float:
    return round((time.perf_counter() - t0) * 1000.0, 3)


class OnnxRunner(AskMixin):
    """ONNX Runtime runner of a bundle; sessions are created once in the constructor."""

    def __init__(self, bundle_dir: str | Path, *, threads: int | None = None,
                 providers: list[str] | None = None, pruning=None, verify: bool = True):
        bundle_dir = Path(bundle_dir)
        manifest = read_manifest(bundle_dir)
        if verify:
            verify_files(bundle_dir, manifest)
        self._setup(bundle_dir, manifest, threads, providers, pruning)

    @classmethod
    def from_manifest(cls, bundle_dir: str | Path, manifest: dict, *, threads=None,
                      providers=None, pruning=None) -> "OnnxRunner":
        """A runner over a manifest held in memory (the exporter's parity check runs before the
        manifest is written); no hash verification."""
        self = cls.__new__(cls)
        self._setup(Path(bundle_dir), manifest, threads, providers, pruning)
        return self

    def _setup(self, bundle_dir: Path, manifest: dict, threads, providers, pruning) -> None:
        self.bundle_dir, self.manifest = bundle_dir, manifest
        parser = manifest["answer"].get("parser")
        if parser not in PARSERS:
            raise BundleError(f"bundle {bundle_dir} uses the answer parser {parser!r}, unknown "
                              f"to this pcbedge (known: {sorted(PARSERS)})",
                              fix="upgrade pcbedge")
        _check_arch(bundle_dir, manifest)
        self.parser = PARSERS[parser]
        self.grammar = manifest["answer"]["grammar"]
        self.input_size = int(manifest["input_size"])
        self.size_multiple = int(manifest.get("size_multiple", 32))
        self.max_text_len = int(manifest["max_text_len"])
        self.max_question_tokens = int(manifest["max_question_tokens"])
        self.token_scores = dict(manifest["token_scores"])
        self._init_sessions(bundle_dir, manifest, threads, providers, pruning)

    def _init_sessions(self, bundle_dir: Path, manifest: dict, threads, providers,
                       pruning) -> None:
        """What every ONNX Runtime runner shares: pruning, tokenizer, engine, providers,
        threads and one session per graph of the manifest."""
        self.bundle_dir, self.manifest = bundle_dir, manifest
        self.pruning = as_pruning_config(manifest["pruning"] if pruning is None else pruning)
        self.tokenizer = Tokenizer.from_file(str(safe_path(bundle_dir, manifest["tokenizer"])))
        runtime = manifest.get("runtime") or {}
        engine = runtime.get("engine", "onnxruntime")
        if engine != "onnxruntime" and providers is None:
            raise HardwareMismatchError(
                f"bundle {bundle_dir} is built for the {engine!r} runtime, not onnxruntime",
                fix=f"run it with the {engine} runner on its target, or pass providers=[...] "
                    "to run its ONNX graphs with ONNX Runtime anyway")
        self.providers = _check_providers(providers if providers is not None
                                          else runtime.get("providers"))
        self.threads = _check_threads(threads if threads is not None else runtime.get("threads"))
        opts = _session_options(runtime, self.threads)
        self.sessions = {}
        for role, g in manifest["graphs"].items():
            path = safe_path(bundle_dir, g["file"])
            try:
                self.sessions[role] = ort.InferenceSession(str(path), sess_options=opts,
                                                           providers=self.providers)
            except Exception as e:  # ORT raises its own Fail/InvalidGraph types
                raise BundleError(f"{g['file']} of bundle {bundle_dir} cannot be loaded by "
                                  f"onnxruntime {ort.__version__}: {e}",
                                  fix="export the bundle again with this pcbedge") from None

    # -- stages -------------------------------------------------------------------------------

    def encode_question(self, question: str) -> list[int]:
        return self.parser.encode_question(self.tokenizer, validate_question(question),
                                           self.max_question_tokens)

    def encode(self, x: np.ndarray) -> EncodedImage:
        """Run the vision graph on one preprocessed input [3, H, W] (or [1, 3, H, W])."""
        x = np.asarray(x, dtype=np.float32)
        x = x[None] if x.ndim == 3 else x
        m = self.size_multiple
        if x.ndim != 4 or x.shape[:2] != (1, 3) or x.shape[2] % m or x.shape[3] % m:
            raise InputImageError(f"model input has shape {tuple(x.shape)}, expected "
                                  f"[3, H, W] with H and W multiples of {m}",
                                  fix="preprocess with pcbedge.data.preprocess.load_pair")
        t0 = time.perf_counter()
        sess = self.sessions["vision"]
        out = sess.run(None, {"pixel_values": np.ascontiguousarray(x)})
        return EncodedImage(dict(zip([o.name for o in sess.get_outputs()], out)), _ms(t0))

    def keep_indices(self, enc: EncodedImage, pruning: TokenPruningConfig) -> np.ndarray | None:
        """Visual tokens kept by ``pruning`` (ascending), or None to keep them all."""
        if not pruning.enabled:
            return None
        name = self.token_scores.get(pruning.method)
        if name not in enc.outputs:
            raise BundleError(f"bundle {self.bundle_dir} has no token score output for pruning "
                              f"method {pruning.method!r}",
                              fix=f"use one of: none, {', '.join(self.token_scores)}")
        return select_tokens(enc.outputs[name][0], pruning)

    def answer_encoded(self, enc: EncodedImage, question: str, meta: PairMeta | None = None, *,
                       max_new_tokens: int = 64, pruning=None) -> dict:
        """Answer ``question`` from the vision outputs of :meth:`encode`."""
        t_start = time.perf_counter()
        validate_max_new_tokens(max_new_tokens)
        ids = self.encode_question(question)
        cfg = self.pruning if pruning is None else as_pruning_config(pruning)
        vis, reg = enc.outputs["visual_tokens"], enc.outputs["region_tokens"]
        n_total = int(vis.shape[1])
        keep = self.keep_indices(enc, cfg)
        if keep is not None:
            vis = np.ascontiguousarray(vis[:, keep])
        state = self.parser.state(self.grammar, enc.outputs["region_scores"][0],
                                  enc.outputs["region_boxes"][0])
        t0 = time.perf_counter()
        logits, past = self.sessions["decoder_prefill"].run(
            ["logits", "present"], {"visual_tokens": vis, "region_tokens": reg,
                                    "input_ids": np.asarray([ids], dtype=np.int64)})
        prefill_ms = _ms(t0)
        t0 = time.perf_counter()
        step = self.sessions["decoder_step"]
        pos, out = len(ids), []
        for _ in range(max_new_tokens):
            tok = state.step(logits[0])
            out.append(tok)
            if state.done or pos >= self.max_text_len - 1:
                break
            logits, past = step.run(["logits", "present"], {
                "input_ids": np.array([[tok]], dtype=np.int64),
                "positions": np.array([[pos]], dtype=np.int64),
                "region_tokens": reg, "past": past})
            pos += 1
        decode_ms = _ms(t0)
        to_orig = meta.to_original if meta is not None else (lambda b: list(b))
        quality = meta.quality_dict() if meta is not None else None
        ans = self.parser.build(state, enc.outputs["region_boxes"][0], to_orig, question,
                                quality=quality)
        ans["raw"] = self.tokenizer.decode(out, skip_special_tokens=False)
        ans["token_ids"] = out
        ans["latency_ms"] = {"preprocess": 0.0, "vision": enc.vision_ms, "prefill": prefill_ms,
                             "decode": decode_ms,
                             "total": round(enc.vision_ms + _ms(t_start), 3)}
        ans["info"] = {"visual_tokens_kept": int(vis.shape[1]), "visual_tokens_total": n_total,
                       "pruning": cfg.to_dict(), "new_tokens": len(out),
                       "engine": "onnxruntime", "providers": self.providers}
        return ans


_LEVELS = {"ORT_DISABLE_ALL": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
           "ORT_ENABLE_BASIC": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
           "ORT_ENABLE_EXTENDED": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
           "ORT_ENABLE_ALL": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}
_MODES = {"sequential": ort.ExecutionMode.ORT_SEQUENTIAL,
          "parallel": ort.ExecutionMode.ORT_PARALLEL}


# When the intra-op threads spin-wait for work. The runner runs three sessions in turn (vision,
# prefill, step), each with its own thread pool; with onnxruntime's default ("always") a pool
# keeps spinning after its Run() returns and takes the cores from the next session and from
# preprocessing: on the 2-core reference box the whole answer ran at P50 88 ms that way against
# 45 ms with "during_run" (docs/build.md). "never" also stops spinning inside a run.
SPIN_WAIT = {"during_run": {"session.force_spinning_stop": "1"},
             "always": {},
             "never": {"session.intra_op.allow_spinning": "0"}}
DEFAULT_SPIN_WAIT = "during_run"


def _session_options(runtime: dict, threads: int | None) -> ort.SessionOptions:
    """Session options from the manifest's runtime block (optimisation level ALL and spin-wait
    during runs only, unless it says otherwise) and the intra-op thread count."""
    level = runtime.get("graph_optimization_level") or "ORT_ENABLE_ALL"
    mode = runtime.get("execution_mode") or "sequential"
    inter = runtime.get("inter_op_threads")
    spin = runtime.get("spin_wait") or DEFAULT_SPIN_WAIT
    if level not in _LEVELS or mode not in _MODES or spin not in SPIN_WAIT:
        raise BundleError(f"manifest runtime block has graph_optimization_level {level!r}, "
                          f"execution_mode {mode!r}, spin_wait {spin!r}",
                          fix=f"valid: {', '.join(_LEVELS)}; {', '.join(_MODES)}; "
                              f"{', '.join(SPIN_WAIT)}")
    opts = ort.SessionOptions()
    opts.graph_optimization_level = _LEVELS[level]
    opts.execution_mode = _MODES[mode]
    opts.log_severity_level = 3
    for key, value in SPIN_WAIT[spin].items():
        opts.add_session_config_entry(key, value)
    if threads is not None:
        opts.intra_op_num_threads = threads
    if inter is not None:
        opts.inter_op_num_threads = _check_threads(inter)
    return opts


def _check_providers(requested) -> list[str]:
    available = ort.get_available_providers()
    wanted = list(requested) if requested else ["CPUExecutionProvider"]
    missing = [p for p in wanted if p not in available]
    if missing:
        raise HardwareMismatchError(
            f"ONNX Runtime execution provider(s) {missing} are not available on this machine",
            fix=f"available providers: {', '.join(available)}; pass providers=[...] with those, "
                "or install the onnxruntime build for this hardware")
    return wanted


def _check_threads(threads) -> int | None:
    if threads is None:
        return None
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise TargetError(f"threads={threads!r} is not a positive integer",
                          fix="use the number of CPU cores to use, or None for the default")
    return threads


_ARCH_ALIASES = {"amd64": "x86_64", "x64": "x86_64", "arm64": "aarch64", "armv8": "aarch64"}


def _norm_arch(a: str) -> str:
    a = a.lower()
    return _ARCH_ALIASES.get(a, a)


def _check_arch(bundle_dir: Path, manifest: dict) -> None:
    """A bundle built for a target names its CPU architecture; refuse to run it on another."""
    target = manifest.get("target") or {}
    want = target.get("arch")
    have = platform.machine()
    if want and have and _norm_arch(want) != _norm_arch(have):
        raise HardwareMismatchError(
            f"bundle {bundle_dir} was built for target {target.get('name')!r} on {want}, "
            f"but this machine is {have}",
            fix=f"build a bundle for this machine: pcbedge build --target <a {have} target>")
