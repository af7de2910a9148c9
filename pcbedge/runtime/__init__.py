"""Runners: answer a question about a (board, template) pair with a bundle (ONNX Runtime, no
torch) or a checkpoint folder (PyTorch, the reference). The family named by the bundle's
manifest (or the checkpoint's config.json) provides the runner; every runner implements
:class:`pcbedge.runtime.protocol.Runner`. This package init stays import-light.
"""
from __future__ import annotations

from pathlib import Path

from pcbedge.errors import BundleError, DependencyError, ModelError, PcbEdgeError, QuestionError

MAX_QUESTION_CHARS = 2000


def validate_question(question) -> str:
    """The question itself, or QuestionError for a non-string, empty or over-long one."""
    if not isinstance(question, str):
        raise QuestionError(f"the question must be text, got {type(question).__name__}",
                            fix="pass the question as a string, e.g. 'where are the defects?'")
    if not question.strip():
        raise QuestionError("the question is empty",
                            fix="ask e.g. 'where are the defects?' or 'how many shorts?'")
    if len(question) > MAX_QUESTION_CHARS:
        raise QuestionError(f"the question is {len(question)} characters long, over the limit "
                            f"of {MAX_QUESTION_CHARS}", fix="ask a shorter question")
    try:  # a lone surrogate (invalid UTF-8 in argv, "\ud800" in JSON) crashes the tokenizer
        question.encode("utf-8")
    except UnicodeEncodeError as e:
        raise QuestionError(f"the question holds {question[e.start:e.end]!r} at character "
                            f"{e.start}, which is not valid text", fix="pass UTF-8 text") from None
    return question


def validate_max_new_tokens(n) -> int:
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise PcbEdgeError(f"max_new_tokens={n!r} is not a positive integer", fix="use e.g. 64")
    return n


def _require(module: str, fix: str) -> None:
    import importlib.util
    if importlib.util.find_spec(module) is None:
        raise DependencyError(f"{module} is not installed", fix=fix)


def load_runner(path: str | Path, **kwargs):
    """The runner of a bundle (has manifest.json; its family's ONNX Runtime runner) or of a
    checkpoint folder (has config.json; its family's PyTorch runner)."""
    from pcbedge.families import detect_family, get_family

    path = Path(path)
    if (path / "manifest.json").is_file():
        from pcbedge.bundle.manifest import read_manifest
        _require("onnxruntime", "a bundle needs ONNX Runtime: pip install onnxruntime")
        manifest = read_manifest(path)
        return get_family(manifest["family"]).onnx_runner(path, **kwargs)
    if (path / "config.json").is_file():
        _require("torch", "a model folder runs on PyTorch: pip install 'pcbedge[export]', or "
                          "export it to a bundle")
        family = detect_family(path)
        family.check_model_dir(path)
        return family.torch_runner(path, **kwargs)
    if not path.exists():
        raise BundleError(f"{path} does not exist",
                          fix="pass a bundle folder (pcbedge export makes one) or a model folder")
    if path.is_dir() and (any(path.glob("*.onnx")) or (path / "manifest.json.partial").exists()):
        raise BundleError(f"bundle {path} is incomplete (graphs but no manifest.json: an "
                          "interrupted export or build)", fix="export or build it again")
    raise ModelError(f"{path} is neither a bundle (manifest.json) nor a model folder "
                     "(config.json)", fix="pass a bundle made by pcbedge export, or a model "
                                          "folder in the Hugging Face layout")
