"""Reading an image file strictly: what reaches the model is either the pixels the file really
holds, or an :class:`~pcbedge.errors.InputImageError` that names the file and says what is wrong.

Pillow alone is not strict enough. Its JPEG decoder silences libjpeg's warnings ("corrupt JPEG
data: bad Huffman code", "premature end of data segment", ...; ``output_message`` is a no-op in
``libImaging/JpegDecode.c``) and returns whatever the damaged stream decodes to; a header that
claims 6000x6000 over 640x640 worth of data decodes to a grey-filled 6000x6000 image; PNG chunk
CRCs are only checked by ``verify()``, not by ``load()``. So, before Pillow decodes the pixels:

1. **The path** is ``stat``-ed before it is opened: a directory, FIFO, device or socket gets its
   own message (a FIFO is never opened, so it cannot block), and the file is opened with
   ``O_NONBLOCK`` and checked again with ``fstat`` (no race with a file swapped in between).
2. **The container** is walked in pure Python (:func:`check_jpeg`, :func:`pcbedge.data.png_check.check_png`):
   JPEG markers in order (SOI, tables, one frame header, scans, restart markers in sequence,
   EOI), table and header lengths, and the amount of entropy-coded data against the number of
   blocks the header claims (each block costs at least its shortest DC plus AC Huffman code);
   PNG chunk order and every chunk's CRC, and the inflated pixel data exactly the size the
   header implies. A header over :data:`MAX_PIXELS` is refused here, before anything is
   decoded (a decompression bomb).
3. **JPEG entropy data** is decoded once more with libjpeg-turbo in strict mode
   (``simplejpeg.decode_jpeg(..., strict=True)``, i.e. ``TJFLAG_STOPONWARNING``): any libjpeg
   warning is an error. About 1 ms for a 640x640 board.

What no decoder can see: JPEG has no checksum, so a flipped bit that still decodes to valid
Huffman codes (a coefficient's magnitude bits, a DC difference) is a valid JPEG of a different
image. Those are left to the pair's damage checks after alignment
(:func:`pcbedge.data.align.jpeg_damage`), which compare the board with its template and warn.
"""
from __future__ import annotations

import logging
import os
import stat
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

MAX_PIXELS = 40_000_000          # refuse decompression bombs before decoding
MAX_FILE_BYTES = 512 * 2**20     # a board image is never this large; nothing bigger is read
STRICT_JPEG_PACKAGE = "simplejpeg"


class ImageDamaged(ValueError):
    """The file's bytes break its format (the reason is the message)."""


class ImageTooLarge(ValueError):
    """The header claims more than :data:`MAX_PIXELS` pixels (``size`` = (w, h))."""

    def __init__(self, size: tuple[int, int]):
        self.size = size
        super().__init__(f"{size[0]}x{size[1]}")


class NotAFile(OSError):
    """The path exists but is not a regular file (``kind`` says what it is)."""

    def __init__(self, kind: str):
        self.kind = kind
        super().__init__(kind)


# --- the path -----------------------------------------------------------------------------------

def _kind(mode: int) -> str | None:
    if stat.S_ISREG(mode):
        return None
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISFIFO(mode):
        return "a named pipe (FIFO)"
    if stat.S_ISCHR(mode):
        return "a character device"
    if stat.S_ISBLK(mode):
        return "a block device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "not a regular file"


def read_file_bytes(path: str | Path) -> bytes:
    """The bytes of a regular file. Raises FileNotFoundError, :class:`NotAFile`,
    PermissionError, :class:`ImageTooLarge` (file over :data:`MAX_FILE_BYTES`; size (0, 0)).

    The path is ``stat``-ed first (a FIFO is never opened), then opened non-blocking and
    ``fstat``-ed again, so a FIFO swapped in between cannot block either."""
    st = os.stat(path)                       # FileNotFoundError, PermissionError, ...
    kind = _kind(st.st_mode)
    if kind:
        raise NotAFile(kind)
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0) \
        | getattr(os, "O_BINARY", 0)
    fd = os.open(path, flags)
    try:
        st = os.fstat(fd)
        kind = _kind(st.st_mode)
        if kind:
            raise NotAFile(kind)
        if st.st_size > MAX_FILE_BYTES:
            raise ImageTooLarge((0, 0))
        if hasattr(os, "set_blocking"):      # a regular file: ordinary (blocking) reads
            os.set_blocking(fd, True)
        chunks, left = [], MAX_FILE_BYTES + 1
        while left > 0:
            b = os.read(fd, min(left, 1 << 24))
            if not b:
                break
            chunks.append(b)
            left -= len(b)
    finally:
        os.close(fd)
    data = b"".join(chunks)
    if len(data) > MAX_FILE_BYTES:
        raise ImageTooLarge((0, 0))
    return data


# --- JPEG ---------------------------------------------------------------------------------------

SOF_MARKERS = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}
HUFFMAN_SEQUENTIAL = {0xC0, 0xC1}        # baseline / extended, Huffman: sizes can be bounded


@dataclass(frozen=True)
class JpegInfo:
    width: int
    height: int
    components: int
    precision: int
    sof: int                 # the frame marker (0xC0 baseline, 0xC2 progressive, ...)
    scans: int
    entropy_bytes: int       # entropy-coded bytes over all scans (stuffing and RSTs excluded)
    min_bits: int            # lower bound on the entropy-coded bits the header implies (0: none)
    trailing_bytes: int      # bytes after EOI (ignored by every decoder)
    exif: bool = False       # an APP1 Exif segment (its orientation is applied by Pillow)


def _u16(data: bytes, i: int) -> int:
    return (data[i] << 8) | data[i + 1]


def _huffman_min_len(counts: bytes) -> int:
    """Shortest code length of a DHT table (its BITS: how many codes of each length 1..16);
    raises on a table whose counts overflow the code space (libjpeg refuses those too)."""
    code, shortest = 0, 0
    for n, c in enumerate(counts, start=1):
        code = 2 * code + c
        if c and not shortest:
            shortest = n
        if code > (1 << n):
            raise ImageDamaged("a Huffman table is invalid (more codes than its lengths allow)")
    if not shortest:
        raise ImageDamaged("a Huffman table is empty")
    return shortest


def check_jpeg(data: bytes) -> JpegInfo:
    """Walk a JPEG's markers and check its structure (see the module docstring). Raises
    :class:`ImageDamaged` or :class:`ImageTooLarge`; returns what the header says."""
    n = len(data)
    if n < 4 or data[0] != 0xFF or data[1] != 0xD8:
        raise ImageDamaged("it does not start with a JPEG start-of-image marker")
    i = 2
    frame = None                       # (precision, height, width, {id: (h, v, tq)})
    sof = 0
    dc_min: dict[int, int] = {}
    ac_min: dict[int, int] = {}
    restart = 0
    scans = 0
    entropy = 0
    min_bits = 0
    exif = False
    while True:
        if i >= n:
            raise ImageDamaged("it ends without its end-of-image marker (truncated)")
        if data[i] != 0xFF:
            raise ImageDamaged(f"byte {i} should start a marker (0xFF) and is 0x{data[i]:02x}")
        while i < n and data[i] == 0xFF:       # fill bytes before a marker are allowed
            i += 1
        if i >= n:
            raise ImageDamaged("it ends without its end-of-image marker (truncated)")
        m = data[i]
        i += 1
        if m == 0xD9:                          # EOI
            if not scans:
                raise ImageDamaged("it ends before its image data (no scan)")
            break
        if m == 0xD8 or 0xD0 <= m <= 0xD7 or m == 0x01 or m == 0x00:
            raise ImageDamaged(f"marker 0xFF{m:02X} at byte {i - 2} is out of place")
        if i + 2 > n:
            raise ImageDamaged("it ends inside a marker segment (truncated)")
        length = _u16(data, i)
        if length < 2:
            raise ImageDamaged(f"marker 0xFF{m:02X} at byte {i - 2} has length {length}")
        if i + length > n:
            raise ImageDamaged(f"it ends inside marker segment 0xFF{m:02X} (truncated)")
        seg = data[i + 2:i + length]
        i += length
        if m in SOF_MARKERS:
            if frame is not None:
                raise ImageDamaged("it holds two frame headers")
            if len(seg) < 6:
                raise ImageDamaged("its frame header is too short")
            p, h, w, nf = seg[0], _u16(seg, 1), _u16(seg, 3), seg[5]
            if len(seg) != 6 + 3 * nf or nf == 0:
                raise ImageDamaged(f"its frame header's length does not fit {nf} components")
            if w == 0 or h == 0:
                raise ImageDamaged(f"its frame header claims {w}x{h} pixels")
            if w * h > MAX_PIXELS:
                raise ImageTooLarge((w, h))
            comps = {}
            for k in range(nf):
                cid, hv, tq = seg[6 + 3 * k:9 + 3 * k]
                hs, vs = hv >> 4, hv & 15
                if not (1 <= hs <= 4 and 1 <= vs <= 4) or tq > 3 or cid in comps:
                    raise ImageDamaged("its frame header has an invalid component")
                comps[cid] = (hs, vs, tq)
            frame, sof = (p, h, w, comps), m
        elif m == 0xC4:                        # DHT
            k = 0
            while k < len(seg):
                if k + 17 > len(seg):
                    raise ImageDamaged("a Huffman table segment is cut short")
                tc, th = seg[k] >> 4, seg[k] & 15
                counts = seg[k + 1:k + 17]
                total = sum(counts)
                if tc > 1 or th > 3 or total > 256 or k + 17 + total > len(seg):
                    raise ImageDamaged("a Huffman table segment is invalid")
                (ac_min if tc else dc_min)[th] = _huffman_min_len(counts)
                k += 17 + total
        elif m == 0xDB:                        # DQT
            k = 0
            while k < len(seg):
                pq, tq = seg[k] >> 4, seg[k] & 15
                size = 64 * (2 if pq else 1)
                if pq > 1 or tq > 3 or k + 1 + size > len(seg):
                    raise ImageDamaged("a quantization table segment is invalid")
                k += 1 + size
        elif m == 0xDD:                        # DRI
            if len(seg) != 2:
                raise ImageDamaged("its restart interval segment is invalid")
            restart = _u16(seg, 0)
        elif m == 0xDA:                        # SOS, then entropy-coded data
            if frame is None:
                raise ImageDamaged("a scan comes before the frame header")
            if not seg or len(seg) != 4 + 2 * seg[0] or not 1 <= seg[0] <= 4:
                raise ImageDamaged("a scan header is invalid")
            ns = seg[0]
            ids = [seg[1 + 2 * k] for k in range(ns)]
            tabs = [seg[2 + 2 * k] for k in range(ns)]
            if any(c not in frame[3] for c in ids) or len(set(ids)) != ns:
                raise ImageDamaged("a scan names a component the frame does not have")
            i, nbytes, nrst = _entropy_segment(data, i, restart)
            entropy += nbytes
            scans += 1
            units = _scan_units(frame, ids)
            if restart and nrst != (units - 1) // restart:
                raise ImageDamaged(f"scan {scans} holds {nrst} restart markers where its "
                                   f"{units} units at interval {restart} need "
                                   f"{(units - 1) // restart}")
            if sof in HUFFMAN_SEQUENTIAL:
                bits = 0
                for cid, tab in zip(ids, tabs):
                    td, ta = tab >> 4, tab & 15
                    if td not in dc_min or ta not in ac_min:
                        raise ImageDamaged("a scan uses a Huffman table that is not defined")
                    bits += _scan_blocks(frame, cid, ns) * (dc_min[td] + ac_min[ta])
                min_bits += bits
                if nbytes * 8 < bits:
                    raise ImageDamaged(
                        f"its header claims {frame[2]}x{frame[1]} pixels, which need at least "
                        f"{(bits + 7) // 8:,} bytes of image data, and scan {scans} holds "
                        f"{nbytes:,}")
        elif m == 0xE1 and seg.startswith(b"Exif"):
            exif = True
        # APPn, COM, DAC, ... are skipped by length
    if frame is None:
        raise ImageDamaged("it has no frame header")
    return JpegInfo(width=frame[2], height=frame[1], components=len(frame[3]),
                    precision=frame[0], sof=sof, scans=scans, entropy_bytes=entropy,
                    min_bits=min_bits, trailing_bytes=n - i, exif=exif)


def _entropy_segment(data: bytes, i: int, restart: int) -> tuple[int, int, int]:
    """From the first entropy-coded byte at ``i``: (index of the marker that ends the scan,
    entropy bytes excluding stuffing and restart markers, restart markers seen). Restart
    markers must come in sequence (RST0..RST7, cycling)."""
    n = len(data)
    start, nrst, stuffed, expect = i, 0, 0, 0
    find = data.find
    while True:
        j = find(b"\xff", i)
        if j < 0 or j + 1 >= n:
            raise ImageDamaged("it ends inside its image data (truncated)")
        m = data[j + 1]
        if m == 0x00:
            stuffed += 1
            i = j + 2
        elif 0xD0 <= m <= 0xD7:
            if not restart:
                raise ImageDamaged(f"restart marker at byte {j} without a restart interval")
            if m - 0xD0 != expect:
                raise ImageDamaged(f"restart marker RST{m - 0xD0} at byte {j} is out of "
                                   f"sequence (RST{expect} expected)")
            expect = (expect + 1) & 7
            nrst += 1
            i = j + 2
        elif m == 0xFF:                        # fill byte before a marker
            i = j + 1
        else:
            return j, j - start - stuffed - 2 * nrst, nrst


def _mcu_geometry(frame) -> tuple[int, int, int, int]:
    _, h, w, comps = frame
    hmax = max(c[0] for c in comps.values())
    vmax = max(c[1] for c in comps.values())
    return h, w, hmax, vmax


def _scan_blocks(frame, cid: int, ns: int) -> int:
    """8x8 blocks of component ``cid`` in a scan of ``ns`` components (an interleaved scan pads
    each component to whole MCUs; a single-component scan covers the component only)."""
    h, w, hmax, vmax = _mcu_geometry(frame)
    hs, vs, _ = frame[3][cid]
    if ns == 1:
        cw, ch = -(-w * hs // hmax), -(-h * vs // vmax)
        return -(-cw // 8) * -(-ch // 8)
    return -(-w // (8 * hmax)) * -(-h // (8 * vmax)) * hs * vs


def _scan_units(frame, ids: list[int]) -> int:
    """Restart-interval units (MCUs) of a scan: blocks of the component for a non-interleaved
    scan, MCUs of the frame for an interleaved one."""
    if len(ids) == 1:
        return _scan_blocks(frame, ids[0], 1)
    h, w, hmax, vmax = _mcu_geometry(frame)
    return -(-w // (8 * hmax)) * -(-h // (8 * vmax))


_strict_state: dict = {}


def _simplejpeg():
    """The strict libjpeg-turbo decoder, or None (logged once) where it is not installed."""
    if "mod" not in _strict_state:
        try:
            import simplejpeg
            _strict_state["mod"] = simplejpeg
        except ImportError:
            _strict_state["mod"] = None
            log.warning("%s is not installed: JPEG entropy-data damage that libjpeg only warns "
                        "about cannot be detected (pip install %s)", STRICT_JPEG_PACKAGE,
                        STRICT_JPEG_PACKAGE)
    return _strict_state["mod"]


def strict_jpeg_available() -> bool:
    return _simplejpeg() is not None


def check_jpeg_entropy(data: bytes, info: JpegInfo) -> bool:
    """Decode the JPEG with libjpeg-turbo stopping on its first warning; raises
    :class:`ImageDamaged` with libjpeg's message. False when the strict decoder is missing or
    cannot decode this kind of JPEG at all (Pillow then decides)."""
    return strict_decode_jpeg(data, info)[0]


def strict_decode_jpeg(data: bytes, info: JpegInfo):
    """(checked, pixels): the JPEG decoded by libjpeg-turbo in strict mode (any warning raises
    :class:`ImageDamaged`). ``pixels`` is the uint8 [H, W] image of a one-component JPEG, the
    very pixels Pillow decodes ('L', same libjpeg-turbo islow IDCT; equal on all 2,088 grey
    DeepPCB images), else None."""
    sj = _simplejpeg()
    if sj is None or info.precision != 8 or info.components not in (1, 3, 4):
        return False, None
    space = "CMYK" if info.components == 4 else "GRAY"
    try:
        out = sj.decode_jpeg(data, colorspace=space, strict=True)
    except TypeError:                      # a simplejpeg older than 1.7 (no strict mode)
        _strict_state["mod"] = None
        log.warning("%s is older than 1.7 (no strict mode): JPEG entropy-data damage cannot "
                    "be detected", STRICT_JPEG_PACKAGE)
        return False, None
    except (ValueError, RuntimeError) as e:
        msg = str(e).strip()
        if any(s in msg for s in _CANNOT_CHECK):
            return False, None             # a valid kind of JPEG TurboJPEG does not decode
        raise ImageDamaged(f"libjpeg: {msg}") from None
    if info.components == 1 and out.ndim == 3 and out.shape[2] == 1:
        return True, out[:, :, 0]
    return True, None


# TurboJPEG messages about what it does not support (rather than what is damaged): Pillow,
# after the structure check, decides on those files
_CANNOT_CHECK = ("Unsupported color conversion", "Unsupported JPEG process",
                 "Could not determine subsampling", "Unsupported JPEG data precision")


# --- PNG: the structure check is pcbedge.data.png_check -----------------------------------------

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

# --- format ---------------------------------------------------------------------------------------

def sniff(data: bytes) -> str:
    if data[:3] == b"\xff\xd8\xff":
        return "jpeg"
    if data.startswith(PNG_SIGNATURE):
        return "png"
    return "other"
