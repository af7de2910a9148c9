"""Qwen2-VL / Qwen2.5-VL input preparation in numpy: no torch, no transformers.

Re-implements, to the value, what transformers computes on the host side of the model, so the
ONNX graphs get the same inputs on a device that has neither library:

* :func:`preprocess_image`: ``Qwen2VLImageProcessor`` (smart resize to the patch grid, bicubic
  PIL resize of the uint8 image, rescale, normalise, temporal duplication, patch order);
* :func:`vision_rotary`, :func:`cu_seqlens`, :func:`window_index`: the vision tower's rotary
  table and attention segments (``rot_pos_emb``, ``get_window_index``);
* :func:`rope_index`: the multimodal rotary positions of the prompt (``get_rope_index``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from pcbedge.errors import InputImageError

MAX_ASPECT = 200   # Qwen's processor refuses more extreme aspect ratios


@dataclass(frozen=True)
class ImageRecipe:
    """The preprocessor config of a checkpoint (``preprocessor_config.json``), as data."""

    patch_size: int = 14
    temporal_patch_size: int = 2
    merge_size: int = 2
    min_pixels: int = 56 * 56
    max_pixels: int = 14 * 14 * 4 * 1280
    image_mean: tuple[float, ...] = (0.48145466, 0.4578275, 0.40821073)
    image_std: tuple[float, ...] = (0.26862954, 0.26130258, 0.27577711)
    rescale_factor: float = 1 / 255

    @classmethod
    def from_config(cls, cfg: dict) -> "ImageRecipe":
        """From a ``preprocessor_config.json`` dict (old ``min_pixels``/``max_pixels`` keys or
        the newer ``size: {shortest_edge, longest_edge}``)."""
        size = cfg.get("size") or {}
        d = cls()
        return cls(patch_size=int(cfg.get("patch_size", d.patch_size)),
                   temporal_patch_size=int(cfg.get("temporal_patch_size", d.temporal_patch_size)),
                   merge_size=int(cfg.get("merge_size", d.merge_size)),
                   min_pixels=int(cfg.get("min_pixels") or size.get("shortest_edge")
                                  or d.min_pixels),
                   max_pixels=int(cfg.get("max_pixels") or size.get("longest_edge")
                                  or d.max_pixels),
                   image_mean=tuple(float(v) for v in cfg.get("image_mean", d.image_mean)),
                   image_std=tuple(float(v) for v in cfg.get("image_std", d.image_std)),
                   rescale_factor=float(cfg.get("rescale_factor", d.rescale_factor)))

    def to_dict(self) -> dict:
        return {"patch_size": self.patch_size, "temporal_patch_size": self.temporal_patch_size,
                "merge_size": self.merge_size, "min_pixels": self.min_pixels,
                "max_pixels": self.max_pixels, "image_mean": list(self.image_mean),
                "image_std": list(self.image_std), "rescale_factor": self.rescale_factor,
                "resample": "bicubic"}


def smart_resize(height: int, width: int, factor: int, min_pixels: int,
                 max_pixels: int) -> tuple[int, int]:
    """Qwen's resize rule: both sides multiples of ``factor``, area within the pixel bounds,
    aspect kept as closely as possible (Python's round, as transformers)."""
    if min(height, width) < 1 or max(height, width) / min(height, width) > MAX_ASPECT:
        raise InputImageError(f"image of {width}x{height} pixels has an aspect ratio over "
                              f"{MAX_ASPECT}", fix="crop the image to the board")
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def load_rgb(path) -> np.ndarray:
    """An image file as uint8 RGB [H, W, 3]; InputImageError when it cannot be read."""
    from PIL import Image, UnidentifiedImageError
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"))
    except (OSError, UnidentifiedImageError, ValueError) as e:
        raise InputImageError(f"cannot read the image {path}: {e}",
                              fix="pass a readable PNG or JPEG file") from None


def preprocess_image(image: np.ndarray, recipe: ImageRecipe) -> tuple[np.ndarray, np.ndarray]:
    """uint8 RGB [H, W, 3] -> (``pixel_values`` f32 [t*h*w, C*T*P*P], ``grid_thw`` i64 [3]),
    exactly as ``Qwen2VLImageProcessor`` for one image."""
    from PIL import Image

    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise InputImageError(f"image array has shape {image.shape} and dtype {image.dtype}",
                              fix="pass uint8 RGB [H, W, 3] (load_rgb reads a file)")
    p, m, tp = recipe.patch_size, recipe.merge_size, recipe.temporal_patch_size
    h, w = smart_resize(image.shape[0], image.shape[1], p * m, recipe.min_pixels,
                        recipe.max_pixels)
    if (h, w) != image.shape[:2]:
        image = np.asarray(Image.fromarray(image).resize((w, h), resample=Image.BICUBIC))
    x = (image.astype(np.float64) * recipe.rescale_factor).astype(np.float32)
    mean = np.asarray(recipe.image_mean, np.float32)
    std = np.asarray(recipe.image_std, np.float32)
    x = ((x - mean) / std).transpose(2, 0, 1)                       # [C, H, W]
    frames = np.repeat(x[None], tp, axis=0)                          # one image = tp frames
    c, gh, gw = x.shape[0], h // p, w // p
    x = frames.reshape(1, tp, c, gh // m, m, p, gw // m, m, p)
    x = x.transpose(0, 3, 6, 4, 7, 2, 1, 5, 8).reshape(gh * gw, c * tp * p * p)
    return np.ascontiguousarray(x, dtype=np.float32), np.array([1, gh, gw], np.int64)


def _patch_positions(grid_thw: np.ndarray, merge: int) -> np.ndarray:
    """(row, col) of every patch in the processor's merge-block order, [n, 2]."""
    out = []
    for t, h, w in np.asarray(grid_thw).reshape(-1, 3):
        hpos = np.broadcast_to(np.arange(h)[:, None], (h, w))
        wpos = np.broadcast_to(np.arange(w)[None, :], (h, w))
        blocks = [a.reshape(h // merge, merge, w // merge, merge).transpose(0, 2, 1, 3).ravel()
                  for a in (hpos, wpos)]
        out.append(np.tile(np.stack(blocks, -1), (int(t), 1)))
    return np.concatenate(out, 0)


def vision_rotary(grid_thw: np.ndarray, head_dim: int, merge: int,
                  theta: float = 10000.0) -> np.ndarray:
    """The vision tower's rotary angles [n_patches, head_dim // 2] (``rot_pos_emb``)."""
    dim = head_dim // 2
    inv_freq = (1.0 / (theta ** (np.arange(0, dim, 2, dtype=np.float32) / dim))).astype(np.float32)
    pos = _patch_positions(grid_thw, merge)
    size = int(np.asarray(grid_thw).reshape(-1, 3)[:, 1:].max())
    table = np.outer(np.arange(size, dtype=np.float32), inv_freq).astype(np.float32)
    return np.ascontiguousarray(table[pos].reshape(len(pos), -1))


def cu_seqlens(grid_thw: np.ndarray) -> np.ndarray:
    """Cumulative patch counts per frame, with a leading 0: the full-attention segments."""
    g = np.asarray(grid_thw).reshape(-1, 3)
    return np.concatenate([[0], np.cumsum(np.repeat(g[:, 1] * g[:, 2], g[:, 0]))]).astype(np.int64)


def window_index(grid_thw: np.ndarray, window_size: int, patch_size: int,
                 merge: int) -> tuple[np.ndarray, np.ndarray]:
    """Qwen2.5-VL's window order of merged tokens and the window segments in patches
    (``get_window_index`` followed by ``unique_consecutive``)."""
    win = window_size // merge // patch_size
    unit = merge * merge
    index, cu, offset = [], [0], 0
    for t, h, w in np.asarray(grid_thw).reshape(-1, 3):
        lh, lw = h // merge, w // merge
        idx = np.arange(t * lh * lw).reshape(t, lh, lw)
        ph, pw = win - lh % win, win - lw % win
        padded = np.pad(idx, ((0, 0), (0, ph), (0, pw)), constant_values=-100)
        nh, nw = (lh + ph) // win, (lw + pw) // win
        padded = padded.reshape(t, nh, win, nw, win).transpose(0, 1, 3, 2, 4)
        padded = padded.reshape(t, nh * nw, win, win)
        seqlens = (padded != -100).sum((2, 3)).ravel()
        flat = padded.ravel()
        index.append(flat[flat != -100] + offset)
        cu.extend((np.cumsum(seqlens) * unit + cu[-1]).tolist())
        offset += int(t * lh * lw)
    cu_arr = np.asarray(cu, np.int64)
    keep = np.concatenate([[True], cu_arr[1:] != cu_arr[:-1]])
    return np.concatenate(index).astype(np.int64), cu_arr[keep]


def rope_index(input_ids, grids: list, *, image_token_id: int, merge: int) -> np.ndarray:
    """Multimodal rotary positions [3, seq] of one prompt (``get_rope_index`` for images):
    text advances all three rows together; an image's tokens take (t, row, col) of its merged
    grid, offset by the text before it; the text after starts past the largest position."""
    ids = np.asarray(input_ids).ravel()
    starts = np.flatnonzero((ids == image_token_id)
                            & np.concatenate([[True], ids[:-1] != image_token_id]))
    if len(starts) != len(grids):
        raise ValueError(f"{len(starts)} image-token runs for {len(grids)} image grids")
    parts, st, nxt = [], 0, 0
    for ed, (t, h, w) in zip(starts, grids):
        lh, lw = int(h) // merge, int(w) // merge
        parts.append(np.broadcast_to(np.arange(ed - st) + nxt, (3, ed - st)))
        nxt += ed - st
        ti, hi, wi = np.meshgrid(np.arange(int(t)), np.arange(lh), np.arange(lw), indexing="ij")
        img = np.stack([ti.ravel(), hi.ravel(), wi.ravel()]) + nxt
        parts.append(img)
        nxt = int(img.max()) + 1
        st = ed + int(t) * lh * lw
    parts.append(np.broadcast_to(np.arange(len(ids) - st) + nxt, (3, len(ids) - st)))
    return np.concatenate(parts, 1).astype(np.int64)
