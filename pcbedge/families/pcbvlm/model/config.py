"""Configuration of the reference PCB VLM (config.json in the Hugging Face layout). No torch."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from pcbedge.errors import ModelError
from pcbedge.geometry import OVERLAP_METRICS

MODEL_TYPE = "pcbvlm"


@dataclass(frozen=True)
class VisionConfig:
    widths: tuple[int, ...] = (24, 32, 48, 64, 96)   # stem s2, s4, s8, s16, s32
    fpn_ch: int = 48
    head_ch: int = 48
    num_classes: int = 6
    num_regions: int = 32
    stride: int = 4          # heatmap stride
    token_stride: int = 32   # visual token stride
    # the defect heatmap averaged with the heatmap of the mirrored board (flipped back): the
    # proposals' scores and peaks come from two views, boxes and features from the first
    flip_average: bool = False
    # the template-consistency check (vision.difference_support): a proposal needs at least
    # min_support differing pixels (in support_core x support_core patches that differ
    # throughout) in its box grown by support_margin px, else its score is 0 and no answer can
    # point at it. 0 = off.
    min_support: float = 0.0
    support_margin: int = 2
    support_core: int = 2
    # the check made tolerant of local misregistration (vision.shift_tolerant_support): a
    # proposal also needs shift_min_support differing pixels (same erosion, same grown box)
    # under every shift of the template by up to shift_tolerance px in steps of shift_step px,
    # counted on the shift_crop px square around the box's centre. 0 = off.
    shift_tolerance: int = 0
    shift_min_support: float = 2.0
    shift_crop: int = 48
    shift_step: int = 1
    # the template-island rule (vision.template_island): a proposal whose box (grown by
    # support_margin) holds copper of the template that the test board lacks, no copper the
    # test adds, and no template copper in the ring of island_ring px around it is an island
    # of the golden template missing from the board (DeepPCB annotates the test board's defects
    # only): its score is 0. 0 = off.
    island_ring: int = 0


@dataclass(frozen=True)
class TextConfig:
    vocab_size: int = 505    # text vocabulary incl. specials, plus the region pointer tokens
    num_regions: int = 32
    d_model: int = 128
    n_layers: int = 3
    n_heads: int = 4
    d_ff: int = 512
    max_text_len: int = 96

    @property
    def text_vocab(self) -> int:
        return self.vocab_size - self.num_regions


@dataclass(frozen=True)
class PcbVlmConfig:
    input_size: int = 640
    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    min_region_score: float = 0.05
    # decoding (see grammar.py): weight of the evidence head's logit added to each pointer
    # logit, and how a region's confidence is read ("softmax": its share of the step's
    # probability; "margin": its logit over <eos>, i.e. "report it rather than stop")
    region_prior_weight: float = 0.0
    region_prior_center: float = 0.5     # evidence score at which the head's vote is neutral
    region_overlap_max: float = 1.0      # overlap above which a box repeats a reported one (1 = off)
    region_overlap_metric: str = "iou"   # "iou", or "iomin": intersection over the smaller box
    region_confidence: str = "softmax"
    model_type: str = MODEL_TYPE

    def __post_init__(self):
        if self.region_overlap_metric not in OVERLAP_METRICS:
            raise ModelError(f"config region_overlap_metric is {self.region_overlap_metric!r}",
                             fix=f"use one of {', '.join(OVERLAP_METRICS)}")
        v = self.vision
        if v.shift_tolerance < 0 or v.shift_step < 1 or (
                v.shift_tolerance > 0 and not 4 <= v.shift_crop <= self.input_size - v.support_core):
            raise ModelError(f"config vision.shift_tolerance {v.shift_tolerance} with shift_crop "
                             f"{v.shift_crop}, shift_step {v.shift_step} at input_size "
                             f"{self.input_size}",
                             fix="use shift_tolerance 0 (off) or a small shift (1-2 px), a "
                                 "shift_step of 1 or more, and a shift_crop of at least 4 px and "
                                 "below the input size")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "PcbVlmConfig":
        if d.get("model_type") != MODEL_TYPE:
            raise ModelError(f"config model_type is {d.get('model_type')!r}, not {MODEL_TYPE!r}")
        v = dict(d.get("vision", {}))
        if "widths" in v:
            v["widths"] = tuple(v["widths"])
        return cls(input_size=d.get("input_size", 640), vision=VisionConfig(**v),
                   text=TextConfig(**d.get("text", {})),
                   min_region_score=d.get("min_region_score", 0.05),
                   region_prior_weight=float(d.get("region_prior_weight", 0.0)),
                   region_prior_center=float(d.get("region_prior_center", 0.5)),
                   region_overlap_max=float(d.get("region_overlap_max", 1.0)),
                   region_overlap_metric=d.get("region_overlap_metric", "iou"),
                   region_confidence=d.get("region_confidence", "softmax"))

    def save(self, path: Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: Path) -> "PcbVlmConfig":
        try:
            return cls.from_dict(json.loads(Path(path).read_text()))
        except (OSError, json.JSONDecodeError, TypeError) as e:
            raise ModelError(f"cannot read model config {path}: {e}",
                             fix="a model folder holds config.json, model.safetensors, "
                                 "tokenizer.json, generation_config.json") from None
