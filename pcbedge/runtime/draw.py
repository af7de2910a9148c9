"""``pcbedge ask --show``: the answer's boxes, types and confidences drawn on the board image."""
from __future__ import annotations

from pathlib import Path

from pcbedge.bundle.atomic import atomic_path
from pcbedge.errors import InputImageError

TYPE_COLORS = {"open": (230, 25, 75), "short": (255, 225, 25), "mousebite": (60, 180, 75),
               "spur": (0, 130, 200), "spurious_copper": (245, 130, 48), "pin_hole": (240, 50, 230)}


def draw_answer(image: Path, ans: dict, out: Path, fmt: str = "PNG") -> None:
    """Draw the answer's boxes, types and confidences on the board image (original pixels)."""
    from PIL import Image, ImageDraw, ImageFont, ImageOps
    try:
        with Image.open(image) as im:
            canvas = ImageOps.exif_transpose(im).convert("RGB")
    except OSError as e:
        raise InputImageError(f"image {image} cannot be decoded for --show: {e}") from None
    draw = ImageDraw.Draw(canvas)
    width = max(2, round(max(canvas.size) / 320))
    font = ImageFont.load_default(size=max(12, max(canvas.size) // 50))
    for d in ans.get("defects", []):
        color = TYPE_COLORS.get(d["type"], (255, 0, 0))
        x1, y1, x2, y2 = d["bbox"]
        draw.rectangle([x1, y1, x2, y2], outline=color, width=width)
        conf = d.get("confidence")   # None where the family gives no confidence
        label = d["type"] if conf is None else f"{d['type']} {conf:.2f}"
        box = draw.textbbox((x1, y1), label, font=font)
        ty = y1 - (box[3] - box[1]) - 2 if y1 - (box[3] - box[1]) - 2 >= 0 else y2 + 2
        box = draw.textbbox((x1, ty), label, font=font)
        draw.rectangle(box, fill=color)
        draw.text((x1, ty), label, fill=(0, 0, 0), font=font)
    with atomic_path(out) as tmp:
        canvas.save(tmp, format=fmt)
