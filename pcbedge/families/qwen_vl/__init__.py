"""Qwen2-VL and Qwen2.5-VL (``model_type`` ``qwen2_vl``, ``qwen2_5_vl``): a team's own
fine-tuned checkpoint in the Hugging Face layout.

Folder: ``export.py`` (graphs ``vision``, ``embed``, ``decoder`` with the tracing patch),
``parity.py``, ``preprocess.py`` (numpy image patches, rotary tables, multimodal positions),
``prompt.py`` (the checkpoint's own chat template), ``runner.py`` / ``torch_runner.py`` (the
runner protocol), ``answer.py`` (grounding-token or JSON replies -> the answer JSON),
``recipe.py`` (calibration feeds of the vision tower and the decoder, drift). Torch-free at
import.
"""
from __future__ import annotations

from pathlib import Path
from typing import ClassVar

from pcbedge.families.base import Family


class QwenVlFamily(Family):
    profile_key = "qwen_vl"
    model_files = ("config.json", "model.safetensors", "tokenizer.json",
                   "preprocessor_config.json")
    bundle_copies = ("tokenizer.json",)
    graph_roles = ("vision", "embed", "decoder")
    # embed is a Gather of the embedding table: it stays FP32 whatever the recipe
    graph_groups = {"vision": ("vision",), "decoder": ("decoder",)}
    template_optional = True
    model_class: ClassVar[str] = ""

    # -- export
    def load_model(self, model_dir):
        from pcbedge.families.qwen_vl import export
        return export.load_model(Path(model_dir), self.model_class)

    def default_input_size(self, model) -> int:
        from pcbedge.families.qwen_vl import export
        return export.default_input_size(model)

    def graphs(self, model, input_size: int) -> list:
        from pcbedge.families.qwen_vl import export
        return export.graphs(model, input_size)

    def reference(self, model, graph: str, feeds: dict) -> dict:
        from pcbedge.families.qwen_vl import export
        return export.reference(model, graph, feeds)

    def manifest_extras(self, model, input_size: int) -> dict:
        from pcbedge.families.qwen_vl import export
        return export.manifest_extras(model, input_size)

    def bundle_files(self, model) -> dict[str, str]:
        from pcbedge.families.qwen_vl.export import CHAT_TEMPLATE_FILE
        return {CHAT_TEMPLATE_FILE: model.pcbedge_chat_template[0]}

    def check_parity(self, model, bundle_dir, manifest: dict, **kwargs) -> dict:
        from pcbedge.families.qwen_vl.parity import check_qwen_parity
        return check_qwen_parity(self, model, Path(bundle_dir), manifest, **kwargs)

    # -- runtime
    def onnx_runner(self, bundle_dir, manifest=None, **kwargs):
        from pcbedge.families.qwen_vl.runner import QwenVlOnnxRunner
        return QwenVlOnnxRunner(bundle_dir, manifest, **kwargs)

    def torch_runner(self, model_dir, **kwargs):
        from pcbedge.families.qwen_vl.torch_runner import QwenVlTorchRunner
        return QwenVlTorchRunner(model_dir, family=self, **kwargs)

    # -- build
    def apply_shapes(self, manifest, shapes, say) -> None:
        from pcbedge.families.qwen_vl import recipe
        recipe.apply_shapes(manifest, shapes, say)

    def calibration_feeds(self, group, role, export_dir, manifest, cal_set):
        from pcbedge.families.qwen_vl import recipe
        return recipe.calibration_feeds(group, role, export_dir, manifest, cal_set)

    def after_quantize(self, group, stage, export_dir, manifest, profile, cal_set, say) -> dict:
        from pcbedge.families.qwen_vl import recipe
        return recipe.after_quantize(group, stage, export_dir, manifest, profile, cal_set, say)

    def trt_axis_ranges(self, manifest, profile, pruning) -> dict:
        from pcbedge.families.qwen_vl import recipe
        return recipe.trt_axis_ranges(manifest, profile, pruning)


class Qwen2VlFamily(QwenVlFamily):
    model_class = "Qwen2VLForConditionalGeneration"


class Qwen25VlFamily(QwenVlFamily):
    model_class = "Qwen2_5_VLForConditionalGeneration"
