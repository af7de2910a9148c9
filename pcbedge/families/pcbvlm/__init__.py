"""The reference PCB VLM (``model_type: pcbvlm``), trained by this project on DeepPCB.

Folder: ``model/`` (its PyTorch definition and training), ``reference/`` (the shipped weights),
``export.py`` (three graphs: vision, decoder_prefill, decoder_step), ``parity.py``,
``runner.py`` / ``torch_runner.py`` (the runner protocol), ``grammar.py`` + ``tokenizer.py``
(the answer language: the decoder points at region proposals), ``recipe.py`` + ``score_bias.py``
(calibration feeds, the INT8 score bias correction, drift). Torch-free at import.
"""
from __future__ import annotations

from pathlib import Path

from pcbedge.families.base import Family

REFERENCE = Path(__file__).resolve().parent / "reference"


class PcbVlmFamily(Family):
    profile_key = "pcbvlm"
    model_files = ("config.json", "model.safetensors", "tokenizer.json", "generation_config.json")
    bundle_copies = ("tokenizer.json",)
    graph_roles = ("vision", "decoder_prefill", "decoder_step")
    graph_groups = {"vision": ("vision",), "decoder": ("decoder_prefill", "decoder_step")}
    ranked_outputs = {"vision": ("region_scores", ("region_tokens", "region_boxes"))}

    # -- export
    def load_model(self, model_dir):
        from pcbedge.families.pcbvlm import export
        return export.load_model(Path(model_dir))

    def default_input_size(self, model) -> int:
        return int(model.cfg.input_size)

    def graphs(self, model, input_size: int) -> list:
        from pcbedge.families.pcbvlm import export
        return export.graphs(model, input_size)

    def reference(self, model, graph: str, feeds: dict) -> dict:
        from pcbedge.families.pcbvlm import export
        return export.reference(model, graph, feeds)

    def reference_answer(self, model, x, question: str, meta, keep=None) -> dict:
        return model.answer(x, question, meta, keep=keep)

    def manifest_extras(self, model, input_size: int) -> dict:
        from pcbedge.families.pcbvlm import export
        return export.manifest_extras(model, input_size)

    def check_parity(self, model, bundle_dir, manifest: dict, **kwargs) -> dict:
        from pcbedge.families.pcbvlm.parity import check_parity
        return check_parity(self, model, Path(bundle_dir), manifest, **kwargs)

    # -- runtime
    def onnx_runner(self, bundle_dir, manifest=None, **kwargs):
        from pcbedge.families.pcbvlm.runner import PcbVlmOnnxRunner
        return PcbVlmOnnxRunner(bundle_dir, manifest, **kwargs)

    def torch_runner(self, model_dir, **kwargs):
        from pcbedge.families.pcbvlm.torch_runner import PcbVlmTorchRunner
        return PcbVlmTorchRunner(model_dir, family=self, **kwargs)

    # -- build
    def apply_shapes(self, manifest, shapes, say) -> None:
        from pcbedge.families.pcbvlm import recipe
        recipe.apply_shapes(manifest, shapes, say)

    def calibration_feeds(self, group, role, export_dir, manifest, cal_set):
        from pcbedge.families.pcbvlm import recipe
        return recipe.calibration_feeds(group, role, export_dir, manifest, cal_set)

    def after_quantize(self, group, stage, export_dir, manifest, profile, cal_set, say) -> dict:
        from pcbedge.families.pcbvlm import recipe
        return recipe.after_quantize(group, stage, export_dir, manifest, profile, cal_set, say)

    def trt_axis_ranges(self, manifest, profile, pruning) -> dict:
        from pcbedge.families.pcbvlm import recipe
        return recipe.trt_axis_ranges(manifest, profile, pruning)
