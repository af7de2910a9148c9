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
    reference_model = REFERENCE
    # fp32 only: the vision graph's template-consistency check counts pixels in integral images
    # that fp16 cannot hold exactly (640 x 640 > 2^11), and its 5 MB of weights gain nothing
    export_precisions = ("fp32",)
    modules = {role: f"pcbedge.families.pcbvlm.{role}"
               for role in ("export", "parity", "runner", "torch_runner", "recipe", "schema",
                            "plan", "train", "testing")}

    def reference_answer(self, model, x, question: str, meta, keep=None) -> dict:
        """The model's own answer loop (parity compares the ONNX answer with it)."""
        return model.answer(x, question, meta, keep=keep)
