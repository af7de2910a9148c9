"""Box-preserving augmentations: the 8 dihedral transforms (flips, 90-degree rotations), crops."""
from __future__ import annotations

import numpy as np


def dihedral(img: np.ndarray, boxes: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Apply transform k in 0..7 to an [..., H, W] array and its [n,4] boxes (x1,y1,x2,y2)."""
    h, w = img.shape[-2:]
    b = boxes.astype(np.float32).copy()
    if k & 4:  # transpose
        img = np.swapaxes(img, -1, -2)
        b = b[:, [1, 0, 3, 2]]
        h, w = w, h
    if k & 1:  # horizontal flip
        img = img[..., :, ::-1]
        b = np.stack([w - b[:, 2], b[:, 1], w - b[:, 0], b[:, 3]], 1) if len(b) else b
    if k & 2:  # vertical flip
        img = img[..., ::-1, :]
        b = np.stack([b[:, 0], h - b[:, 3], b[:, 2], h - b[:, 1]], 1) if len(b) else b
    return np.ascontiguousarray(img), b.reshape(-1, 4)


def crop(img: np.ndarray, boxes: np.ndarray, types: np.ndarray, x0: int, y0: int, size: int,
         min_visible: float = 0.5):
    """Crop [..., y0:y0+size, x0:x0+size]; keep boxes with >= min_visible of their area inside."""
    out = img[..., y0:y0 + size, x0:x0 + size]
    if not len(boxes):
        return out, boxes, types
    c = boxes - np.array([x0, y0, x0, y0], np.float32)
    cl = np.clip(c, 0, size)
    area = (c[:, 2] - c[:, 0]) * (c[:, 3] - c[:, 1])
    vis = (cl[:, 2] - cl[:, 0]).clip(0) * (cl[:, 3] - cl[:, 1]).clip(0)
    keep = vis >= min_visible * np.maximum(area, 1e-6)
    return out, cl[keep], types[keep]


def capture_noise(img: np.ndarray, rng, sigma_max: float) -> np.ndarray:
    """Sensor noise on the test image only (channel 0 of a uint8 [2, H, W] pair): the
    robustness bench's own degradation (:func:`pcbedge.data.degrade.noise`) at a sigma drawn
    uniformly in [0, sigma_max] grey levels. The template is the golden image and stays clean;
    boxes do not move."""
    from pcbedge.data.degrade import noise
    seed = rng.getrandbits(32)
    test, _ = noise(rng.uniform(0.0, sigma_max), seed)(img[0], img[1])
    return np.stack([test, img[1]])


def capture_blur(img: np.ndarray, rng, radius_max: float) -> np.ndarray:
    """Defocus on the test image only: the robustness bench's Gaussian blur
    (:func:`pcbedge.data.degrade.blur`) at a radius drawn uniformly in [0.3, radius_max] px;
    boxes do not move."""
    from pcbedge.data.degrade import blur
    test, _ = blur(rng.uniform(0.3, radius_max))(img[0], img[1])
    return np.stack([test, img[1]])


def capture_etch(img: np.ndarray, boxes: np.ndarray, types: np.ndarray, rng):
    """Etching variation: the test board's copper 1 px wider or narrower than the golden
    image's all over (the robustness bench's :func:`pcbedge.data.degrade.etch`), so every copper
    edge differs by a sliver that is not a defect. A label is kept only where its defect is
    still to be seen when both images are etched alike (a hair-thin spur can vanish)."""
    from pcbedge.data.degrade import etch
    from pcbedge.families.pcbvlm.model.augment_layout import still_different
    f = etch(rng.choice((-1, 1)))
    test, _ = f(img[0], img[1])
    temp_etched, _ = f(img[1], img[1])        # the template etched the same way, for the labels
    both = np.stack([test, temp_etched])
    b, t = still_different(both, boxes, types)
    return np.stack([test, img[1]]), b, t


def capture_etch_local(img: np.ndarray, boxes: np.ndarray, types: np.ndarray, rng,
                       px_max: int = 2, side_min: int = 32, side_max: int = 128):
    """Local etching variation: inside one window (a square of side_min..side_max px centred on
    a copper edge, kept inside the crop) the test board's copper is 1..px_max px wider or
    narrower than the golden image's, as one trace segment etched unevenly: both edges of the
    copper there differ by a sliver, which no shift of the template explains and which is not a
    defect. A label is kept only where its defect is still to be seen when both images are
    etched alike there. A crop with no copper edge is returned as it is."""
    from pcbedge.data.degrade import etch
    from pcbedge.families.pcbvlm.model.augment_layout import still_different
    h, w = img.shape[-2:]
    f = etch(rng.choice((-1, 1)) * rng.randint(1, px_max))
    etched = f(img[0], img[1])[0]       # on the whole image, so the window's border reads its
    ys, xs = np.nonzero(etched != img[0])   # neighbours as they are; centred on a copper edge
    if not len(ys):
        return img, boxes, types
    i = rng.randrange(len(ys))
    side = min(h, w, rng.randint(side_min, side_max))
    x0 = min(max(int(xs[i]) - side // 2, 0), w - side)
    y0 = min(max(int(ys[i]) - side // 2, 0), h - side)
    window = (slice(y0, y0 + side), slice(x0, x0 + side))
    test, temp_etched = img[0].copy(), img[1].copy()
    test[window] = etched[window]
    temp_etched[window] = f(img[1], img[1])[0][window]
    b, t = still_different(np.stack([test, temp_etched]), boxes, types)
    return np.stack([test, img[1]]), b, t
