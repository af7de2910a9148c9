"""Vision side of the reference PCB VLM: a small conv net with a CenterNet-style defect head.

The head proposes up to K regions (peaks of the class-max heatmap after a 3x3 max-pool NMS, then
TopK), each with a box regressed at its peak; the projector turns the stride-32 features into
visual tokens and the proposals into region tokens. Everything here exports to ONNX (TopK,
gather, max-pool) and runs on TensorRT's parser.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from pcbedge.families.pcbvlm.model.config import PcbVlmConfig

REGION_FEATS_EXTRA = 6 + 4 + 1   # class probs, normalised box, score


def conv_bn(cin: int, cout: int, k: int = 3, s: int = 1, act: bool = True) -> nn.Sequential:
    layers = [nn.Conv2d(cin, cout, k, s, k // 2, bias=False), nn.BatchNorm2d(cout)]
    if act:
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


class ResBlock(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.a = conv_bn(c, c)
        self.b = conv_bn(c, c, act=False)

    def forward(self, x):
        return F.relu(x + self.b(self.a(x)))


class Backbone(nn.Module):
    """Features at strides 4, 8, 16, 32 merged top-down into one stride-4 map."""

    def __init__(self, cfg: PcbVlmConfig):
        super().__init__()
        w = cfg.vision.widths
        f = cfg.vision.fpn_ch
        self.stem = nn.Sequential(conv_bn(3, w[0], s=2), conv_bn(w[0], w[1], s=2))
        self.s8 = nn.Sequential(conv_bn(w[1], w[2], s=2), ResBlock(w[2]))
        self.s16 = nn.Sequential(conv_bn(w[2], w[3], s=2), ResBlock(w[3]))
        self.s32 = nn.Sequential(conv_bn(w[3], w[4], s=2), ResBlock(w[4]))
        self.lat = nn.ModuleList(nn.Conv2d(c, f, 1) for c in w[1:])
        self.smooth = conv_bn(f, cfg.vision.head_ch)

    def forward(self, x):
        c4 = self.stem(x)
        c8 = self.s8(c4)
        c16 = self.s16(c8)
        c32 = self.s32(c16)
        p = self.lat[3](c32)
        for lat, c in ((self.lat[2], c16), (self.lat[1], c8), (self.lat[0], c4)):
            p = lat(c) + F.interpolate(p, scale_factor=2.0, mode="nearest")
        return self.smooth(p), c32


class DefectHead(nn.Module):
    """Heatmap per class (sigmoid), log box size in stride units, sub-cell centre offset."""

    def __init__(self, cfg: PcbVlmConfig):
        super().__init__()
        c = cfg.vision.head_ch
        self.heat = nn.Sequential(conv_bn(c, c), nn.Conv2d(c, cfg.vision.num_classes, 1))
        self.box = nn.Sequential(conv_bn(c, c), nn.Conv2d(c, 4, 1))
        nn.init.constant_(self.heat[-1].bias, -2.19)

    def forward(self, feat):
        return self.heat(feat), self.box(feat)


def sincos_2d(h: int, w: int, dim: int, device=None) -> torch.Tensor:
    """[h*w, dim] fixed 2-D sine/cosine positions (computed in-graph for any grid size)."""
    q = dim // 4
    omega = 1.0 / (10000 ** (torch.arange(q, device=device, dtype=torch.float32) / q))
    ys = torch.arange(h, device=device, dtype=torch.float32)
    xs = torch.arange(w, device=device, dtype=torch.float32)
    gy, gx = torch.meshgrid(ys, xs, indexing="ij")
    oy = gy.reshape(-1, 1) * omega.reshape(1, -1)
    ox = gx.reshape(-1, 1) * omega.reshape(1, -1)
    return torch.cat([oy.sin(), oy.cos(), ox.sin(), ox.cos()], dim=1)


def _topk_lower_index_first(flat, k: int):
    """Top-k with ties broken by the lower index, as ONNX's TopK specifies (and ONNX Runtime
    does). Eager torch.topk leaves tie order unspecified, so eager mode uses a stable sort; the
    exported graph keeps the cheap TopK. Ties are real: flat board areas give equal scores."""
    if torch.compiler.is_exporting() or torch.onnx.is_in_onnx_export():
        return torch.topk(flat, k, dim=1)
    vals, idx = torch.sort(flat, dim=1, descending=True, stable=True)
    return vals[:, :k], idx[:, :k]


def extract_regions(heat_logits, box, feat, k: int, stride: int, input_hw):
    """Top-K peaks of the class-max heatmap -> boxes (input pixels), scores, raw region features."""
    b, c, h, w = heat_logits.shape
    prob = torch.sigmoid(heat_logits)
    peak = prob.amax(dim=1, keepdim=True)
    keep = (F.max_pool2d(peak, 3, 1, 1) == peak).to(peak.dtype)
    flat = (peak * keep).reshape(b, h * w)
    scores, idx = _topk_lower_index_first(flat, k)
    ys = torch.div(idx, w, rounding_mode="floor").to(torch.float32)
    xs = (idx - torch.div(idx, w, rounding_mode="floor") * w).to(torch.float32)
    gbox = torch.gather(box.reshape(b, 4, h * w), 2, idx.unsqueeze(1).expand(b, 4, k))
    cx = (xs + torch.sigmoid(gbox[:, 2])) * stride
    cy = (ys + torch.sigmoid(gbox[:, 3])) * stride
    bw = torch.exp(gbox[:, 0].clamp(-4, 6)) * stride
    bh = torch.exp(gbox[:, 1].clamp(-4, 6)) * stride
    H, W = input_hw
    boxes = torch.stack([(cx - bw / 2).clamp(min=0), (cy - bh / 2).clamp(min=0),
                         torch.minimum(cx + bw / 2, W), torch.minimum(cy + bh / 2, H)], dim=2)
    cls = torch.gather(prob.reshape(b, c, h * w), 2, idx.unsqueeze(1).expand(b, c, k))
    f = torch.gather(feat.reshape(b, feat.shape[1], h * w), 2,
                     idx.unsqueeze(1).expand(b, feat.shape[1], k))
    norm = torch.stack([W, H, W, H]).reshape(1, 1, 4)
    raw = torch.cat([f.transpose(1, 2), cls.transpose(1, 2), boxes / norm,
                     scores.unsqueeze(2)], dim=2)
    return boxes, scores, raw


def difference_support(diff, boxes, margin: int, core: int = 3):
    """Per box: the number of pixels where test and template differ (|diff| > 0.5) in a
    ``core`` x ``core`` patch that differs throughout (an erosion: with core 2 or 3 the 1 px
    slivers that misregistration leaves along copper edges drop out), inside the box grown by
    ``margin`` px. ``diff`` [B,1,H,W], ``boxes`` [B,K,4] in input pixels -> [B,K] float counts
    (exact: an integral image of 0/1 values in float32). A patch is anchored at its top-left
    pixel; the image's right and bottom edges count as no difference."""
    d = (diff > 0.5).to(torch.float32)
    if core > 1:
        d = -F.max_pool2d(-F.pad(d, (0, core - 1, 0, core - 1)), core, 1)
    return _box_sums(d, boxes, margin)[..., 0]


def shift_tolerant_support(x, boxes, margin: int, core: int, shift: int, crop: int,
                           step: int = 1):
    """Per box: the fewest differing pixels (in ``core`` x ``core`` patches that differ
    throughout, as :func:`difference_support` counts them) that any shift of the template by up
    to ``shift`` px in x and y leaves inside the box grown by ``margin`` px: a difference that a
    small local misregistration explains (a sliver along a copper edge, 2-3 px wide where the
    board is locally a pixel or two off) counts nothing at its best shift; a defect counts at
    every shift. With ``step`` > 1 only the shifts that are multiples of it are tried (-2, 0, 2
    for ``shift`` 2, ``step`` 2): after a core-2 erosion a residual of 1 px counts nothing, so
    every 1-3 px translation still meets a shift that leaves no counted sliver.

    Counted on the ``crop`` x ``crop`` square around each box's centre (kept inside the image):
    exact for a box whose grown window fits the square, the window's central part for a larger
    one. ``x`` [B,3,H,W] (test, template, |diff|; copper is dark, H and W at least ``crop`` +
    ``core``), ``boxes`` [B,K,4] in input pixels -> [B,K] float counts. The crops are gathered
    from the flattened images with indices clamped to the image (beyond it, both images repeat
    their edge pixels), so the cost is K crops x (2 ``shift`` + 1)^2 shifts, not the whole board
    per shift."""
    b, _, h, w = x.shape
    k = boxes.shape[1]
    n_t = crop + core - 1                     # test crop side (the erosion reads core - 1 more)
    n_p = n_t + 2 * shift                     # template crop side (every shift in reach)
    H = torch.scalar_tensor(h, dtype=torch.float32)
    W = torch.scalar_tensor(w, dtype=torch.float32)
    cx = ((boxes[..., 0] + boxes[..., 2]) * 0.5).floor()
    cy = ((boxes[..., 1] + boxes[..., 3]) * 0.5).floor()
    qx = torch.minimum(torch.clamp(cx - crop // 2, min=0), W - crop)      # [B,K] crop corner
    qy = torch.minimum(torch.clamp(cy - crop // 2, min=0), H - crop)
    reach = torch.arange(n_p, dtype=torch.float32, device=x.device) - shift
    ys = torch.minimum(torch.clamp(qy.unsqueeze(-1) + reach, min=0), H - 1)      # [B,K,n_p]
    xs = torch.minimum(torch.clamp(qx.unsqueeze(-1) + reach, min=0), W - 1)
    flat = (ys.unsqueeze(-1) * W + xs.unsqueeze(-2)).to(torch.int64).reshape(b, 1, -1)
    # gather the grey crops, then threshold: copper is decided on the crops only, not the board
    crops = torch.gather(x[:, 0:2].reshape(b, 2, h * w), 2, flat.expand(b, 2, flat.shape[2]))
    crops = (crops < 0.5).to(torch.float32)
    crops = crops.reshape(b, 2, k, n_p, n_p).transpose(1, 2).reshape(b * k, 2, n_p, n_p)
    test = crops[:, 0:1, shift:shift + n_t, shift:shift + n_t]
    temp = crops[:, 1]
    offsets = range(-shift, shift + 1, step)
    views = torch.stack([temp[:, shift + dy:shift + dy + n_t, shift + dx:shift + dx + n_t]
                         for dy in offsets for dx in offsets], 1)
    d = (views - test).abs()                                              # [BK,S,n_t,n_t] 0/1
    if core > 1:   # the erosion: a patch's mean is exactly 1 only where all of it differs
        d = F.avg_pool2d(d, core, 1).floor()                              # [BK,S,crop,crop]
    # the window (the box grown by margin, as _box_sums counts it) within the crop: a row and
    # a column selector, summed by two small products
    at = torch.arange(crop, dtype=torch.float32, device=x.device)
    gx, gy = qx.unsqueeze(-1) + at, qy.unsqueeze(-1) + at                 # [B,K,crop]
    lo, hi = (boxes - margin).floor(), (boxes + margin).ceil()
    in_x = ((gx >= lo[..., 0:1]) & (gx < hi[..., 2:3])).to(torch.float32).reshape(b * k, 1, crop, 1)
    in_y = ((gy >= lo[..., 1:2]) & (gy < hi[..., 3:4])).to(torch.float32).reshape(b * k, 1, 1, crop)
    sums = torch.matmul(in_y, torch.matmul(d, in_x))                      # [BK,S,1,1]
    return sums.reshape(b * k, -1).amin(1).reshape(b, k)


def _box_sums(maps, boxes, grow: float):
    """Per box and map: the sum of each 0/1 map [B,C,H,W] inside the box grown by ``grow`` px
    -> [B,K,C]: pixels x1 <= x < x2, y1 <= y < y2 with x1 = floor(box x1 - grow), x2 = ceil(box
    x2 + grow), clamped to the image (and likewise in y)."""
    return _window_sums(maps, (boxes - grow).floor(), (boxes + grow).ceil())


def _window_sums(maps, lo, hi):
    """Per window and map: the sum of each map [B,C,H,W] over lo[..,0] <= x < hi[..,2],
    lo[..,1] <= y < hi[..,3] (windows [B,K,4]; outside the image counts nothing) -> [B,K,C].

    Two products with 0/1 selection matrices: the columns of every window ([B,W,K]) in one GEMM
    over the maps' rows, then its rows. Exact in float32 for 0/1 maps (sums below 2^24), and a
    fraction of the cost of integral images (two full-image CumSums per map in ONNX Runtime took
    10 ms of a 20 ms vision graph on this CPU)."""
    b, c, h, w = maps.shape
    xs = torch.arange(w, device=maps.device).to(maps.dtype).reshape(1, w, 1)
    ys = torch.arange(h, device=maps.device).to(maps.dtype).reshape(1, 1, h)
    cols = ((xs >= lo[..., 0].unsqueeze(1)) & (xs < hi[..., 2].unsqueeze(1))).to(maps.dtype)
    rows = ((ys >= lo[..., 1].unsqueeze(2)) & (ys < hi[..., 3].unsqueeze(2))).to(maps.dtype)
    per_row = torch.matmul(maps.reshape(b, c * h, w), cols).reshape(b, c, h, -1)  # [B,C,H,K]
    return (per_row * rows.transpose(1, 2).unsqueeze(1)).sum(2).transpose(1, 2)


def _window_area(lo, hi, h, w):
    """Pixels of each window [B,K,4] inside an h x w image (what _window_sums counts)."""
    dx = (torch.minimum(hi[..., 2], w) - torch.clamp(lo[..., 0], min=0)).clamp(min=0)
    dy = (torch.minimum(hi[..., 3], h) - torch.clamp(lo[..., 1], min=0)).clamp(min=0)
    return dx * dy


def template_island(x, boxes, margin: int, ring: int):
    """Per box: True where the box grown by ``margin`` px holds a speck of the golden template
    that the board lacks, of either colour, and nothing else: a flaw of the template, not a
    defect of the board (DeepPCB annotates the board's defects only).

    - dark (copper): template copper that the test board lacks, no copper the test board adds,
      and no template copper in the ring of ``ring`` px around it (an island of the template);
    - light: a hole of the template that the test board fills (copper the board adds, none it
      lacks), with template copper throughout the ring around it.

    ``x`` [B,3,H,W] (test, template, |diff| in [0, 1]; copper is dark), ``boxes`` [B,K,4] in
    input pixels -> [B,K] bool. One pass over three maps: the inner and the outer windows go
    through the same products, and the template's bare pixels in the ring are the ring's area
    less its copper."""
    test, temp = x[:, 0:1] < 0.5, x[:, 1:2] < 0.5
    maps = torch.cat([(temp & ~test), (test & ~temp), temp], 1).to(torch.float32)
    k = boxes.shape[1]
    lo = torch.cat([(boxes - margin).floor(), (boxes - margin - ring).floor()], 1)
    hi = torch.cat([(boxes + margin).ceil(), (boxes + margin + ring).ceil()], 1)
    sums = _window_sums(maps, lo, hi)                              # [B,2K,3]
    h = torch.scalar_tensor(x.shape[2], dtype=torch.float32)
    w = torch.scalar_tensor(x.shape[3], dtype=torch.float32)
    area = _window_area(lo, hi, h, w)
    lacks, adds = sums[:, :k, 0], sums[:, :k, 1]
    ring_copper = sums[:, k:, 2] - sums[:, :k, 2]
    ring_bare = (area[:, k:] - area[:, :k]) - ring_copper
    dark = (lacks > 0) & (adds == 0) & (ring_copper == 0)
    light = (adds > 0) & (lacks == 0) & (ring_bare == 0)
    return dark | light


class VisionEncoder(nn.Module):
    """Backbone + defect head + proposals; ``forward`` returns the raw (pre-projector) outputs."""

    def __init__(self, cfg: PcbVlmConfig):
        super().__init__()
        self.cfg = cfg
        self.backbone = Backbone(cfg)
        self.head = DefectHead(cfg)

    def dense(self, x):
        feat, c32 = self.backbone(x)
        heat, box = self.head(feat)
        return feat, c32, heat, box

    def dense_averaged(self, x):
        """``dense`` with the heatmap averaged over the board and its mirror image (flipped
        back), when the config asks for it: both views go through the backbone as one batch."""
        if not self.cfg.vision.flip_average:
            return self.dense(x)
        b = x.shape[0]
        feat, c32, heat, box = self.dense(torch.cat([x, x.flip(3)], dim=0))
        p = (torch.sigmoid(heat[:b]) + torch.sigmoid(heat[b:]).flip(3)) * 0.5
        p = p.clamp(1e-6, 1 - 1e-6)
        return feat[:b], c32[:b], torch.log(p) - torch.log1p(-p), box[:b]

    def forward(self, x):
        feat, c32, heat, box = self.dense_averaged(x)
        # scalar_tensor of a shape stays symbolic under torch.export (torch.tensor(float(...))
        # would freeze the example's size into the graph and break boxes at other sizes)
        H = torch.scalar_tensor(x.shape[2])
        W = torch.scalar_tensor(x.shape[3])
        boxes, scores, raw = extract_regions(heat, box, feat, self.cfg.vision.num_regions,
                                             self.cfg.vision.stride, (H, W))
        if self.cfg.vision.min_support > 0:
            # the template-consistency check: a proposal with too little test/template
            # difference at its place scores 0, below every runner's min_region_score, so the
            # grammar can never report it. Only the score output is gated: the region tokens
            # (raw) are what the decoder was trained on.
            support = difference_support(x[:, 2:3], boxes, self.cfg.vision.support_margin,
                                         self.cfg.vision.support_core)
            scores = scores * (support >= self.cfg.vision.min_support).to(scores.dtype)
        if self.cfg.vision.shift_tolerance > 0:
            # the check, tolerant of local misregistration: the difference must survive every
            # shift of the template by up to shift_tolerance px (shift_min_support pixels)
            v = self.cfg.vision
            kept = shift_tolerant_support(x, boxes, v.support_margin, v.support_core,
                                          v.shift_tolerance, v.shift_crop, v.shift_step)
            scores = scores * (kept >= v.shift_min_support).to(scores.dtype)
        if self.cfg.vision.island_ring > 0:
            # the template-island rule: template copper missing from the board, isolated on the
            # template, is the template's flaw; the proposal scores 0 (grammar never reports it)
            island = template_island(x, boxes, self.cfg.vision.support_margin,
                                     self.cfg.vision.island_ring)
            scores = scores * (~island).to(scores.dtype)
        # token scores for pruning: defect prior (max heat per token cell), template difference
        r = self.cfg.vision.token_stride // self.cfg.vision.stride
        prior = F.max_pool2d(torch.sigmoid(heat).amax(1, keepdim=True), r, r).flatten(1)
        diff = F.avg_pool2d(x[:, 2:3], self.cfg.vision.token_stride).flatten(1)
        return c32, boxes, scores, raw, prior, diff


class Projector(nn.Module):
    """Stride-32 features -> visual tokens (+ 2-D positions); region features -> region tokens."""

    def __init__(self, cfg: PcbVlmConfig):
        super().__init__()
        d = cfg.text.d_model
        self.vis = nn.Linear(cfg.vision.widths[-1], d)
        self.reg = nn.Sequential(nn.Linear(cfg.vision.head_ch + REGION_FEATS_EXTRA, d), nn.GELU(),
                                 nn.Linear(d, d))
        self.d = d

    def forward(self, c32, raw):
        b, c, h, w = c32.shape
        vis = self.vis(c32.flatten(2).transpose(1, 2)) + sincos_2d(h, w, self.d, c32.device)
        return vis, self.reg(raw)


def heatmap_targets(boxes_by_image, types_by_image, h: int, w: int, stride: int):
    """CenterNet targets on an h x w grid: gaussian heatmaps, and box targets at centre cells."""
    n = len(boxes_by_image)
    heat = torch.zeros(n, 6, h, w)
    box_t = torch.zeros(n, 4, h, w)
    box_m = torch.zeros(n, 1, h, w)
    yy = torch.arange(h, dtype=torch.float32).reshape(h, 1)
    xx = torch.arange(w, dtype=torch.float32).reshape(1, w)
    for i, (bxs, tys) in enumerate(zip(boxes_by_image, types_by_image)):
        for (x1, y1, x2, y2), t in zip(bxs, tys):
            cx, cy = (x1 + x2) / 2 / stride, (y1 + y2) / 2 / stride
            bw, bh = max(x2 - x1, 1.0) / stride, max(y2 - y1, 1.0) / stride
            ix, iy = int(min(max(cx, 0), w - 1)), int(min(max(cy, 0), h - 1))
            sx, sy = max(bw / 6, 0.8), max(bh / 6, 0.8)
            g = torch.exp(-((xx - ix) ** 2) / (2 * sx * sx) - ((yy - iy) ** 2) / (2 * sy * sy))
            heat[i, t] = torch.maximum(heat[i, t], g)
            box_t[i, :, iy, ix] = torch.tensor([math.log(bw), math.log(bh),
                                                _logit(cx - ix), _logit(cy - iy)])
            box_m[i, 0, iy, ix] = 1.0
    return heat, box_t, box_m


def _logit(p: float) -> float:
    p = min(max(p, 0.02), 0.98)
    return math.log(p / (1 - p))


def detection_loss(heat_logits, box, heat_t, box_t, box_m):
    """Penalty-reduced focal loss (CenterNet) + L1 on box targets at centres."""
    p = torch.sigmoid(heat_logits).clamp(1e-4, 1 - 1e-4)
    pos = heat_t.eq(1).float()
    neg = 1 - pos
    pos_l = -(torch.log(p) * (1 - p) ** 2 * pos).sum()
    neg_l = -(torch.log(1 - p) * p ** 2 * (1 - heat_t) ** 4 * neg).sum()
    npos = pos.sum().clamp(min=1)
    focal = (pos_l + neg_l) / npos
    l1 = (F.l1_loss(box, box_t, reduction="none") * box_m).sum() / (box_m.sum() * 4).clamp(min=1)
    return focal, l1
