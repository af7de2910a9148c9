"""A PNG's structure checked in pure Python before Pillow decodes it: chunk order, every chunk's
CRC (Pillow's ``load()`` skips them), and the inflated image data exactly the size the header
implies, read with a bounded inflate so no decompression bomb is expanded. Part of the strict
image path of :mod:`pcbedge.data.image_io`."""
from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass

from pcbedge.data.image_io import MAX_PIXELS, PNG_SIGNATURE, ImageDamaged, ImageTooLarge

_PNG_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}
_PNG_DEPTHS = {0: (1, 2, 4, 8, 16), 2: (8, 16), 3: (1, 2, 4, 8), 4: (8, 16), 6: (8, 16)}
_ADAM7 = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2),
          (0, 1, 1, 2))


@dataclass(frozen=True)
class PngInfo:
    width: int
    height: int
    bit_depth: int
    color_type: int
    interlace: int
    pixel_bytes: int         # the inflated image data (filter bytes included)


def png_data_size(w: int, h: int, depth: int, color: int, interlace: int) -> int:
    """Bytes of inflated IDAT data a PNG of this header holds (one filter byte per row)."""
    bpp = _PNG_CHANNELS[color] * depth

    def rows(pw, ph):
        return ph * (1 + (pw * bpp + 7) // 8) if pw and ph else 0
    if not interlace:
        return rows(w, h)
    return sum(rows(max(0, -(-(w - x0) // dx)), max(0, -(-(h - y0) // dy)))
               for x0, y0, dx, dy in _ADAM7)


def check_png(data: bytes) -> PngInfo:
    """Check a PNG's structure: chunk order, every chunk's CRC, and the inflated image data
    exactly the size its header implies (read with a bounded inflate: no bomb is expanded).
    Raises :class:`ImageDamaged` or :class:`ImageTooLarge`."""
    n = len(data)
    if not data.startswith(PNG_SIGNATURE):
        raise ImageDamaged("it does not start with the PNG signature")
    i = 8
    header = None
    idat: list[bytes] = []
    idat_done = False
    while True:
        if i + 8 > n:
            raise ImageDamaged("it ends without its IEND chunk (truncated)")
        length = struct.unpack_from(">I", data, i)[0]
        tag = data[i + 4:i + 8]
        if length > 0x7FFFFFFF or not tag.isalpha():
            raise ImageDamaged(f"the chunk at byte {i} is invalid (length {length}, "
                               f"type {tag!r})")
        end = i + 8 + length
        if end + 4 > n:
            raise ImageDamaged(f"it ends inside its {tag.decode('latin-1')} chunk (truncated)")
        body = data[i + 8:end]
        crc = struct.unpack_from(">I", data, end)[0]
        if zlib.crc32(body, zlib.crc32(tag)) != crc:
            raise ImageDamaged(f"the CRC of its {tag.decode('latin-1')} chunk at byte {i} "
                               "does not match (the data is damaged)")
        name = tag.decode("latin-1")
        if header is None and name != "IHDR":
            raise ImageDamaged("its first chunk is not IHDR")
        if name == "IHDR":
            if header is not None or length != 13:
                raise ImageDamaged("its IHDR chunk is invalid")
            w, h, depth, color, comp, filt, inter = struct.unpack(">IIBBBBB", body)
            if w == 0 or h == 0 or color not in _PNG_DEPTHS or depth not in _PNG_DEPTHS[color] \
                    or comp or filt or inter > 1:
                raise ImageDamaged(f"its header is invalid ({w}x{h}, bit depth {depth}, "
                                   f"colour type {color})")
            if w * h > MAX_PIXELS:
                raise ImageTooLarge((w, h))
            header = (w, h, depth, color, inter)
        elif name == "IDAT":
            if idat_done:
                raise ImageDamaged("its image data (IDAT) chunks are not consecutive")
            idat.append(body)
        elif idat:
            idat_done = True
        i = end + 4
        if name == "IEND":
            break
    if not idat:
        raise ImageDamaged("it holds no image data (IDAT)")
    w, h, depth, color, inter = header
    want = png_data_size(w, h, depth, color, inter)
    d = zlib.decompressobj()
    try:
        got = d.decompress(b"".join(idat), want + 1)
    except zlib.error as e:
        raise ImageDamaged(f"its image data does not inflate ({e})") from None
    if len(got) > want:
        raise ImageDamaged(f"its image data holds more than the {want:,} bytes its "
                           f"{w}x{h} header implies")
    if not d.eof:
        if len(got) < want:
            raise ImageDamaged(f"its header claims {w}x{h} pixels ({want:,} bytes of image "
                               f"data) and the data holds {len(got):,} (truncated?)")
        raise ImageDamaged("its image data stream does not end where it should")
    if len(got) != want:
        raise ImageDamaged(f"its header claims {w}x{h} pixels ({want:,} bytes of image data) "
                           f"and the data holds {len(got):,}")
    if not inter:
        stride = 1 + (w * _PNG_CHANNELS[color] * depth + 7) // 8
        if max(got[::stride]) > 4:
            raise ImageDamaged("a row of its image data has an invalid filter type")
    return PngInfo(w, h, depth, color, inter, want)
