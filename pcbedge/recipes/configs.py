"""The one recipe vocabulary: a frozen config per quantization scheme, dispatched by type
(:func:`pcbedge.recipes.quantize.quantize_graph`), used by target profiles and builds alike.

* :class:`StaticInt8Config`: INT8 Q/DQ calibrated on real feeds (convolutions, weight MatMuls);
* :class:`DynamicInt8Config`: INT8 weights, activation scales computed per run (no calibration);
* :class:`WeightOnlyInt4Config`: 4-bit weights in blocks, activations float (ONNX Runtime's
  MatMulNBits), for decoders whose cost is reading their weights;
* :class:`Fp16Config`: the graph stays FP32 ONNX and the engine builder runs it in FP16
  (TensorRT);
* visual-token pruning is its own config: :class:`pcbedge.runtime.pruning.TokenPruningConfig`.

:func:`config_for_group` turns a target profile's ``[precision]`` / ``[quantization]`` into the
config of a graph group ("vision", "decoder"), or None for FP32.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any, ClassVar

from pcbedge.errors import TargetError

CALIBRATION_METHODS = ("minmax", "percentile", "entropy")
TYPES = ("uint8", "int8")
# INT8 over a long token axis destroys Softmax (measured, docs/build.md); LayerNorm's variance
# is as sensitive. These stay float whatever a profile asks.
ALWAYS_FLOAT = ("Softmax", "LayerNormalization")
# Conv nodes with fewer output channels than this stay float by default: the 6- and 4-channel
# head outputs (heatmap logits, box regression) are too narrow for the int8 kernels to gain
# anything, and their rounding lands directly on the scores and boxes. The 3-channel stem stays
# int8: its input is pixels / 255, which uint8 represents exactly, and keeping it float cost
# ~20% of the int8 graph's time (float conv + layout reorders around it; docs/build.md).
DEFAULT_MIN_CONV_CHANNELS = 8


def _check_choice(name: str, value, valid: tuple) -> None:
    if value not in valid:
        raise TargetError(f"quantization {name} {value!r} is not valid",
                          fix=f"use one of: {', '.join(valid)}")


class _Recipe:
    scheme: ClassVar[str] = ""
    precision: ClassVar[str] = ""
    needs_calibration: ClassVar[bool] = False

    def to_dict(self) -> dict:
        d = {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()}
        if "extra_options" in d:
            d["extra_options"] = {k: v for k, v in self.extra_options}
        return {"scheme": self.scheme, **d}


@dataclass(frozen=True)
class StaticInt8Config(_Recipe):
    """Static INT8 in QDQ form. ``extra_options`` go to onnxruntime's ``quantize_static`` as they
    are (sorted (key, value) pairs, so the config stays hashable)."""

    scheme: ClassVar[str] = "qdq_static"
    precision: ClassVar[str] = "int8"
    needs_calibration: ClassVar[bool] = True

    op_types: tuple[str, ...] = ("Conv",)
    per_channel: bool = True
    # 7-bit weights: x86 u8s8 kernels without VNNI (AVX2, AVX-512F/BW) sum pairs of u8 x s8
    # products in int16 (vpmaddubsw), which saturates with 8-bit weights; 7 bits cannot
    reduce_range: bool = False
    calibration_method: str = "minmax"
    activation_type: str = "uint8"
    weight_type: str = "int8"
    activation_symmetric: bool = False
    nodes_to_exclude: tuple[str, ...] = ()
    min_conv_channels: int = DEFAULT_MIN_CONV_CHANNELS
    preprocess: bool = True
    # gather from the int8 tensor, dequantize only what was gathered (gathers_read_quantized)
    gather_quantized: bool = True
    extra_options: tuple[tuple[str, Any], ...] = field(default=())

    def __post_init__(self):
        _check_choice("calibration_method", self.calibration_method, CALIBRATION_METHODS)
        _check_choice("activation_type", self.activation_type, TYPES)
        _check_choice("weight_type", self.weight_type, TYPES)
        if not self.op_types:
            raise TargetError("quantization op_types is empty",
                              fix="name the op types to quantize, e.g. ['Conv']")
        bad = sorted(set(self.op_types) & set(ALWAYS_FLOAT))
        if bad:
            raise TargetError(f"quantization op_types include {bad}, which pcbedge keeps in "
                              "float: int8 Softmax over the token axis and int8 LayerNorm "
                              "destroy the answer", fix="remove them from the op list")
        if self.activation_type == "int8" and self.weight_type == "uint8":
            raise TargetError("int8 activations with uint8 weights are not supported by "
                              "onnxruntime", fix="use weight_type 'int8'")

    def with_options(self, **options) -> "StaticInt8Config":
        """A copy with more ``extra_options`` (e.g. ``QDQKeepRemovableActivations=True``)."""
        merged = dict(self.extra_options) | options
        return replace(self, extra_options=tuple(sorted(merged.items())))


@dataclass(frozen=True)
class DynamicInt8Config(_Recipe):
    """INT8 weights of ``op_types`` (per channel), activations quantized per run."""

    scheme: ClassVar[str] = "int8_dynamic"
    precision: ClassVar[str] = "int8"

    op_types: tuple[str, ...] = ("MatMul",)
    per_channel: bool = True

    def __post_init__(self):
        bad = sorted(set(self.op_types) - {"MatMul", "Gemm"})
        if not self.op_types or bad:
            raise TargetError(f"dynamic INT8 op_types {list(self.op_types)} are not valid",
                              fix="use ['MatMul'] (and 'Gemm')")


@dataclass(frozen=True)
class WeightOnlyInt4Config(_Recipe):
    """4-bit weights of the MatMuls with a constant B, ``block_size`` weights per scale."""

    scheme: ClassVar[str] = "int4_weight"
    precision: ClassVar[str] = "int4"

    block_size: int = 32
    symmetric: bool = True
    # what MatMulNBits computes with (its accuracy_level): "float" dequantizes the weights;
    # "int8" quantizes the activations per block and uses int8 dot products (4.7x the float
    # path's matrix-vector rate on the 2-core build box, docs/real-size.md)
    compute: str = "float"
    # the projection that writes a graph output (a decoder's vocabulary head) in 4-bit too;
    # False keeps it float, as AWQ tools and TensorRT Edge-LLM leave it
    head: bool = True

    def __post_init__(self):
        if self.compute not in INT4_COMPUTE:
            raise TargetError(f"int4 compute {self.compute!r} is not one of "
                              f"{', '.join(INT4_COMPUTE)}", fix='use "float" or "int8"')
        b = self.block_size
        if isinstance(b, bool) or not isinstance(b, int) or b < 16 or b & (b - 1):
            raise TargetError(f"block_size {b!r} is not a power of two >= 16",
                              fix="use 32 (or 64, 128)")


@dataclass(frozen=True)
class Fp16Config(_Recipe):
    """FP16 execution decided by the engine builder; the ONNX graph is left as it is."""

    scheme: ClassVar[str] = "fp16_build_flag"
    precision: ClassVar[str] = "fp16"


INT4_COMPUTE = {"float": None, "int8": 4}   # -> MatMulNBits accuracy_level (None: unset)
RECIPES = (StaticInt8Config, DynamicInt8Config, WeightOnlyInt4Config, Fp16Config)

# The Q/DQ flavour each runtime reads best. TensorRT's explicit quantization takes int8 with zero
# point 0 only (symmetric); onnxruntime's x86 kernels are u8 x s8 (docs/build.md measures both).
RUNTIME_FLAVOURS: dict[str, dict] = {
    "onnxruntime": {"activation_type": "uint8", "activation_symmetric": False},
    # TensorRT fuses a float bias into its int8 convolutions; an int32 bias DequantizeLinear is
    # not something its parser takes
    "tensorrt": {"activation_type": "int8", "activation_symmetric": True,
                 "extra_options": (("QuantizeBias", False),),
                 # its parser places Q/DQ itself; an int8 Gather is not a placement it documents
                 "gather_quantized": False},
}


def config_for_group(profile, group: str):
    """The recipe config a target profile asks for graph group ``group`` ("vision" or
    "decoder"), or None when that group stays FP32."""
    precision = getattr(profile.precision, group)
    q = profile.quantization
    if precision == "fp32":
        return None
    if precision == "fp16":
        return Fp16Config()
    if precision == "int4":
        return WeightOnlyInt4Config(block_size=q.block_size, compute=q.int4_compute,
                                    head=q.int4_head)
    ops = tuple(getattr(q, f"{group}_ops"))
    if group == "decoder" and q.decoder_method == "dynamic":
        return DynamicInt8Config(op_types=ops or ("MatMul",), per_channel=q.per_channel)
    return StaticInt8Config(op_types=ops, per_channel=q.per_channel,
                            reduce_range=q.reduce_range, weight_type=q.weight_type,
                            calibration_method=q.calibration_method,
                            **RUNTIME_FLAVOURS[profile.runtime])
