"""Qwen2-VL and Qwen2.5-VL (``model_type`` ``qwen2_vl``, ``qwen2_5_vl``): a team's own
fine-tuned checkpoint in the Hugging Face layout.

Folder: ``export.py`` (graphs ``vision``, ``embed``, ``decoder`` with the tracing patch),
``parity.py``, ``preprocess.py`` (numpy image patches, rotary tables, multimodal positions),
``prompt.py`` (the checkpoint's own chat template), ``runner.py`` / ``torch_runner.py`` (the
runner protocol), ``answer.py`` (grounding-token or JSON replies -> the answer JSON),
``recipe.py`` (calibration feeds of the vision tower and the decoder, drift), ``schema.py``
(its own manifest fields). Torch-free at import.
"""
from __future__ import annotations

from typing import ClassVar

from pcbedge.families.base import Family


class QwenVlFamily(Family):
    profile_key = "qwen_vl"
    model_files = ("config.json", "model.safetensors", "tokenizer.json",
                   "preprocessor_config.json")
    bundle_copies = ("tokenizer.json",)
    graph_roles = ("decoder", "vision", "embed")   # the export's order: see export.graphs
    # embed is a Gather of the embedding table: it stays FP32 whatever the recipe
    graph_groups = {"vision": ("vision",), "decoder": ("decoder",)}
    template_optional = True
    export_precisions = ("fp32", "fp16", "bf16")   # weights of gigabytes: fp16 halves them
    modules = {role: f"pcbedge.families.qwen_vl.{role}"
               for role in ("export", "parity", "runner", "torch_runner", "recipe",
                            "schema", "plan", "testing")}
    model_class: ClassVar[str] = ""   # the transformers class of the checkpoint


class Qwen2VlFamily(QwenVlFamily):
    model_class = "Qwen2VLForConditionalGeneration"


class Qwen25VlFamily(QwenVlFamily):
    model_class = "Qwen2_5_VLForConditionalGeneration"
