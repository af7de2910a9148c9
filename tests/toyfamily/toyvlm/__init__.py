"""A toy VLM family that lives only in the tests: everything a family is, in one folder, and
registered with one line (``register_family("toyvlm", "toyvlm:ToyFamily")``). It proves that a
new family goes through export, build, bench and ask without touching pcbedge's core.

The "VLM": a two-conv vision tower giving a defect heatmap at stride 4 (the visual tokens, and
their score for pruning) and a bag-of-words decoder whose two logits say "list" or "count".
Each heatmap cell above 0.5 is a defect box. Torch is imported only by the export side."""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from pcbedge.families.base import Family
from pcbedge.runtime.protocol import Encoded, Prepared, Runner, ms_since

STRIDE = 4
MAX_TOKENS = 16
WORDS = ("where", "are", "the", "defects", "how", "many", "is", "there", "a", "short", "open")


def make_checkpoint(folder: Path, input_size: int = 64, seed: int = 0) -> Path:
    """config.json, model.safetensors, tokenizer.json of a random toy model."""
    import torch
    from safetensors.torch import save_file
    from tokenizers import Tokenizer, models, pre_tokenizers

    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    module = ToyModule()
    with torch.no_grad():   # a few cells above 0.5, as a trained head would give
        module.conv2.bias.fill_(-3.0)
    save_file({k: v.contiguous() for k, v in module.state_dict().items()},
              str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({"model_type": "toyvlm",
                                                    "input_size": input_size}))
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(("[UNK]",) + WORDS)},
                                     unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(folder / "tokenizer.json"))
    return folder


def ToyModule():   # noqa: N802  (a factory: torch is imported on demand)
    import torch
    from torch import nn

    class _Toy(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = nn.Conv2d(3, 8, 3, stride=STRIDE, padding=1)
            self.conv2 = nn.Conv2d(8, 1, 1)
            self.embed = nn.Embedding(len(WORDS) + 1, 16)
            self.head = nn.Linear(16, 2)

        def vision(self, pixel_values):
            return self.conv2(torch.relu(self.conv1(pixel_values)))[:, 0]

        def decoder(self, input_ids):
            return self.head(self.embed(input_ids).mean(1))
    return _Toy()


def decide(heat: np.ndarray, logits: np.ndarray, meta, keep: np.ndarray | None) -> dict:
    """The answer from the heatmap [h, w] and the decoder's logits [2]."""
    prob = 1.0 / (1.0 + np.exp(-heat))
    cells = np.argwhere(prob > 0.5)
    if keep is not None:
        cells = np.asarray([c for c in cells if c[0] * heat.shape[1] + c[1] in set(keep)])
    defects = []
    for y, x in cells.reshape(-1, 2):
        box = [float(x * STRIDE), float(y * STRIDE), float(x * STRIDE + STRIDE),
               float(y * STRIDE + STRIDE)]
        box = meta.to_original(box) if meta is not None else box
        defects.append({"type": "short", "bbox": list(box),
                        "confidence": round(float(prob[y, x]), 4)})
    intent = ("locate", "count")[int(np.argmax(logits))]
    n = len(defects)
    return {"answer": f"{n} defect(s)", "intent": intent, "filter": None, "count": n,
            "defects": defects, "complete": True}


class ToyRunner(Runner):
    """ONNX Runtime (``sessions``) or PyTorch (``module``) toy runner: one protocol."""

    def __init__(self, input_size: int, tokenizer, *, sessions=None, module=None, manifest=None,
                 pruning=None):
        from pcbedge.runtime.pruning import as_pruning_config
        self.input_size, self.tokenizer = input_size, tokenizer
        self.sessions, self.module = sessions, module
        self.manifest = manifest or {"family": "toyvlm", "input_size": input_size}
        self.pruning = as_pruning_config(self.manifest.get("pruning") if pruning is None
                                         else pruning)

    def prepare(self, image, template=None) -> Prepared:
        from pcbedge.data.preprocess import load_pair
        self.check_template(template)
        return Prepared(*load_pair(image, template, self.input_size))

    def _run(self, graph: str, feed: np.ndarray) -> np.ndarray:
        if self.sessions is not None:
            name = "pixel_values" if graph == "vision" else "input_ids"
            return self.sessions[graph].run(None, {name: feed})[0]
        import torch
        with torch.no_grad():
            return getattr(self.module, graph)(torch.from_numpy(feed)).numpy()

    def encode(self, prepared: Prepared) -> Encoded:
        t0 = time.perf_counter()
        heat = self._run("vision", np.ascontiguousarray(prepared.inputs[None], np.float32))
        return Encoded(heat[0], prepared, ms_since(t0))

    def answer(self, encoded: Encoded, question: str, *, max_new_tokens: int = 64,
               pruning=None) -> dict:
        from pcbedge.runtime.pruning import as_pruning_config, select_tokens
        t0 = time.perf_counter()
        ids = (self.tokenizer.encode(question).ids or [0])[:MAX_TOKENS]
        logits = self._run("decoder", np.asarray([ids], np.int64))[0]
        cfg = self.pruning if pruning is None else as_pruning_config(pruning)
        keep = select_tokens(encoded.outputs.reshape(-1), cfg) if cfg.enabled else None
        ans = decide(encoded.outputs, logits, encoded.meta, keep)
        n = int(encoded.outputs.size)
        ans.update(token_ids=[int(np.argmax(logits))], raw="",
                   latency_ms={"preprocess": encoded.prepared.preprocess_ms,
                               "vision": encoded.vision_ms, "prefill": ms_since(t0),
                               "decode": 0.0, "total": encoded.vision_ms + ms_since(t0)},
                   info={"visual_tokens_kept": n if keep is None else len(keep),
                         "visual_tokens_total": n, "pruning": cfg.to_dict()})
        return ans


class ToyFamily(Family):
    profile_key = "toyvlm"
    model_files = ("config.json", "model.safetensors", "tokenizer.json")
    bundle_copies = ("tokenizer.json",)
    graph_roles = ("vision", "decoder")
    graph_groups = {"vision": ("vision",), "decoder": ("decoder",)}

    def plan_calls(self, manifest: dict, typical: dict):
        """One answer: the vision graph on the board, the decoder once over the question."""
        from pcbedge.plan import Call
        size = int(manifest["input_size"])
        return ([Call("vision", "vision", {"batch": 1, "height": size, "width": size}),
                 Call("prefill", "decoder", {"batch": 1, "seq": int(typical.get("words", 5))})],
                {"decode_tokens": 0})

    def load_model(self, model_dir):
        from safetensors.torch import load_file
        m = ToyModule()
        m.load_state_dict(load_file(str(Path(model_dir) / "model.safetensors")))
        m.input_size = json.loads((Path(model_dir) / "config.json").read_text())["input_size"]
        return m.eval()

    def default_input_size(self, model) -> int:
        return int(model.input_size)

    def graphs(self, model, input_size: int) -> list:
        import torch
        from torch import nn
        from torch.export import Dim

        from pcbedge.export.graphs import GraphExport, TensorSpec

        class Vision(nn.Module):
            def __init__(self, m):
                super().__init__()
                self.m = m

            def forward(self, pixel_values):
                return self.m.vision(pixel_values)

        class Decoder(Vision):
            def forward(self, input_ids):
                return self.m.decoder(input_ids)

        h4, w4 = Dim("h4", min=2, max=1024), Dim("w4", min=2, max=1024)
        batch, seq = Dim("batch", min=1, max=64), Dim("seq", min=1, max=MAX_TOKENS)
        return [
            GraphExport("vision", "vision.onnx", Vision(model), (torch.rand(2, 3, input_size,
                                                                            input_size),),
                        (TensorSpec("pixel_values", "float32", ("batch", 3, "height", "width")),),
                        (TensorSpec("heat", "float32", ("batch", "h4", "w4")),),
                        {"pixel_values": {0: batch, 2: STRIDE * h4, 3: STRIDE * w4}}),
            GraphExport("decoder", "decoder.onnx", Decoder(model),
                        (torch.randint(0, len(WORDS), (2, 5)),),
                        (TensorSpec("input_ids", "int64", ("batch", "seq")),),
                        (TensorSpec("logits", "float32", ("batch", 2)),),
                        {"input_ids": {0: batch, 1: seq}})]

    def reference(self, model, graph: str, feeds: dict) -> dict:
        import torch
        x = torch.from_numpy(next(iter(feeds.values())))
        with torch.no_grad():
            out = model.vision(x) if graph == "vision" else model.decoder(x)
        return {"heat" if graph == "vision" else "logits": out.numpy()}

    def manifest_extras(self, model, input_size: int) -> dict:
        return {"kv_cache": None, "visual_tokens": (input_size // STRIDE) ** 2,
                "visual_token_stride": STRIDE, "size_multiple": STRIDE,
                "token_scores": {"model_prior": "heat"}, "num_regions": 0,
                "input_size": input_size, "preprocess": {"input_size": input_size},
                "tokenizer": "tokenizer.json", "max_question_tokens": MAX_TOKENS,
                "max_text_len": MAX_TOKENS, "answer": {"parser": "toy-v1"},
                "precision": {"vision": "fp32", "decoder": "fp32"}}

    def check_parity(self, model, bundle_dir, manifest: dict, atol=1e-3, rtol=1e-3,
                     **kwargs) -> dict:
        from pcbedge.errors import ExportError
        from pcbedge.export.parity import ParityErrors
        runner = self.onnx_runner(bundle_dir, manifest)
        errors = ParityErrors(atol, rtol)
        for side in (manifest["input_size"], manifest["input_size"] // 2):
            x = np.random.default_rng(side).random((1, 3, side, side), dtype=np.float32)
            errors.add("vision", "heat", runner._run("vision", x),
                       self.reference(model, "vision", {"pixel_values": x})["heat"], f"{side}")
        ids = np.asarray([[1, 2, 3, 4]], np.int64)
        errors.add("decoder", "logits", runner._run("decoder", ids),
                   self.reference(model, "decoder", {"input_ids": ids})["logits"], "ids")
        if errors.failures:
            raise ExportError("toy parity: " + "; ".join(errors.failures), fix="-")
        return {"passed": True, "graphs": errors.graphs}

    def onnx_runner(self, bundle_dir, manifest=None, threads=None, providers=None,
                    pruning=None, verify=True):
        from pcbedge.bundle.manifest import read_manifest, verify_files
        from pcbedge.runtime.sessions import load_tokenizer, open_sessions
        if manifest is None:
            manifest = read_manifest(bundle_dir)
            if verify:
                verify_files(bundle_dir, manifest)
        s = open_sessions(Path(bundle_dir), manifest, threads=threads, providers=providers)
        return ToyRunner(int(manifest["input_size"]), load_tokenizer(Path(bundle_dir), manifest),
                         sessions=s.sessions, manifest=manifest, pruning=pruning)

    def torch_runner(self, model_dir, threads=None, pruning=None):
        from tokenizers import Tokenizer
        m = self.load_model(model_dir)
        return ToyRunner(m.input_size, Tokenizer.from_file(str(Path(model_dir) /
                                                               "tokenizer.json")),
                         module=m, pruning=pruning)

    def apply_shapes(self, manifest, shapes, say) -> None:
        manifest["input_size"] = shapes.input_size // STRIDE * STRIDE
        manifest["visual_tokens"] = (manifest["input_size"] // STRIDE) ** 2

    def calibration_feeds(self, group, role, export_dir, manifest, cal_set):
        from pcbedge.data.preprocess import load_pair
        if role == "vision":
            return [{"pixel_values": load_pair(e.test_path, e.template_path,
                                               manifest["input_size"])[0][None]}
                    for e in cal_set.entries]
        return [{"input_ids": np.asarray([[1, 2, 3]], np.int64)}]

    def trt_axis_ranges(self, manifest, profile, pruning) -> dict:
        side = manifest["input_size"]
        return {"batch": (1, 1, 1), "height": (side,) * 3, "width": (side,) * 3,
                "h4": (side // STRIDE,) * 3, "w4": (side // STRIDE,) * 3,
                "seq": (1, 8, MAX_TOKENS)}
