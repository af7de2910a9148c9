"""Training of the reference PCB VLM on the DeepPCB trainval split (train part only).

Stage A trains the vision encoder's defect head on random crops (dihedral transforms, crops that
keep boxes right). Stage B freezes the vision encoder, caches its outputs on whole boards under
all 8 dihedral transforms, and trains projector + decoder on generated questions with
visual-token dropout (so pruning later costs little). Stage C fits the confidence calibration
on the validation part. Deterministic under a seed (single-threaded data, seeded torch).
"""
from __future__ import annotations

import json
import logging
import math
import random
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from pcbedge.data.deeppcb import DEFECT_TYPES, Board, read_list, split_designs, split_trainval
from pcbedge.data.align import align_pair
from pcbedge.errors import DatasetError
from pcbedge.data.preprocess import pair_to_input, read_gray, resize_u8
from pcbedge.data.qa import vocabulary_corpus
from pcbedge.families.pcbvlm.model.augment import (capture_blur, capture_etch,
                                                   capture_etch_local, capture_noise, crop,
                                                   dihedral)
from pcbedge.families.pcbvlm.model.augment_layout import (DefectBank, line_width, paste_defects,
                                                          scale_pair, still_different)
from pcbedge.families.pcbvlm.model.config import PcbVlmConfig, TextConfig
from pcbedge.families.pcbvlm.model.hard_mining import DefectDifficulty, centre_prob, find_focus
from pcbedge.families.pcbvlm.model.model import PcbVlm
from pcbedge.families.pcbvlm.model.resume import StageCheckpoint, refuse_other_settings
from pcbedge.families.pcbvlm.tokenizer import build_tokenizer
from pcbedge.families.pcbvlm.model.vision import detection_loss, heatmap_targets

log = logging.getLogger(__name__)
TYPE_ID = {t: i for i, t in enumerate(DEFECT_TYPES)}


@dataclass(frozen=True)
class FinetuneConfig:
    seed: int = 0
    minutes_a: float = 32.0      # stage A time budget
    steps_a: int = 100000        # upper bound on stage A steps (the time budget usually stops it)
    batch_a: int = 16
    crop: int = 256
    lr_a: float = 2e-3
    minutes_b: float = 22.0
    steps_b: int = 100000
    batch_b: int = 32
    lr_b: float = 1e-3
    n_dihedral: int = 8
    match_iou: float = 0.3
    word_dropout: float = 0.08
    # stage B: this share of questions gets one made-up word inserted (qa_kinds.
    # insert_unknown_word); 0 = off, as for the runs before run 16
    word_insert: float = 0.0
    threads: int = 2
    init_from: str | None = None  # a saved model folder to start from (e.g. checkpoint_stage_a)
    set_pointer_loss: bool = True  # REGION target = every unreported true region (else: next one)
    quality_calibration: bool = True  # stage C2: confidence falls with the capture's residual
    p_board: float = 0.4          # stage B: share of board-pass examples (the rest: programs)
    # "trainval": the last 20 % of every group validates (seen designs only); "designs": whole
    # groups (HELD_OUT_GROUPS) are never trained on, and stage C calibrates on them
    split: str = "trainval"
    # layout-changing augmentation (augment_layout.py; off by default: chosen by the design
    # protocol, docs/data.md): crops scaled by up to 1 +/- scale_jitter, copper lines 1 px
    # wider or narrower in a p_line share of crops, 1-2 bank defects pasted into p_paste of them
    scale_jitter: float = 0.0
    p_line: float = 0.0
    p_paste: float = 0.0
    # capture augmentation (augment.py; off by default): sensor noise of sigma up to
    # noise_sigma_max grey levels on the test image of a p_noise share of crops, a Gaussian
    # blur of radius up to blur_radius_max px on a p_blur share (the template stays clean)
    p_noise: float = 0.0
    noise_sigma_max: float = 20.0
    p_blur: float = 0.0
    blur_radius_max: float = 2.0
    # etching variation (augment.py): the test image's copper 1 px wider or narrower than the
    # template's all over, in a p_etch share of crops (labels a uniform edge sliver as no defect)
    p_etch: float = 0.0
    # local etching variation (augment.py): inside one window of the crop the test copper is
    # 1-2 px wider or narrower than the template's (one unevenly etched segment), in a
    # p_etch_local share of crops; 0 = off, as for the runs before run 19
    p_etch_local: float = 0.0
    # stage A: this share of crops is centred on a training defect drawn in proportion to how
    # badly the head still scores it (hard_mining.py); 0 = off (every crop drawn as before)
    hard_mining: float = 0.0
    # stages A and B save their state to OUT/stage_*.resume.pt this often (0 = never);
    # resume=True continues a killed run from it, or skips a stage whose checkpoint exists
    # (resume.py)
    checkpoint_minutes: float = 10.0
    resume: bool = False

    def settings(self) -> dict:
        """What a resumed run must share with the run it continues."""
        return {k: v for k, v in asdict(self).items()
                if k not in ("threads", "checkpoint_minutes", "resume", "steps_a", "steps_b")}


class Board8:
    """A board's pixels and boxes, loaded once (uint8)."""

    def __init__(self, b: Board, size: int):
        self.id = b.id
        test, temp, _ = align_pair(read_gray(b.test_path), read_gray(b.template_path))
        self.img = np.stack([resize_u8(test, size), resize_u8(temp, size)])  # as load_pair
        self.boxes = np.array([d.bbox for d in b.defects], np.float32).reshape(-1, 4)
        self.types = np.array([TYPE_ID[d.type] for d in b.defects], np.int64)


def _to_input(img_u8: np.ndarray) -> np.ndarray:
    return pair_to_input(img_u8[0], img_u8[1])


def sample_crop(rng: random.Random, bd: Board8, size: int, fc: FinetuneConfig | None = None,
                bank: DefectBank | None = None):
    """A training crop (model input, boxes, types): a random dihedral view, centred near a random
    defect in 70 % of draws, else anywhere, then the layout augmentation ``fc`` asks for."""
    return _crop(rng, bd, size, fc, bank, None)[:3]


def sample_focused_crop(rng: random.Random, bd: Board8, defect: int, size: int,
                        fc: FinetuneConfig | None = None, bank: DefectBank | None = None):
    """A crop centred near defect ``defect`` of ``bd`` (hard-defect sampling): (model input,
    boxes, types, index of that defect among the boxes or -1 when augmentation dropped it)."""
    x, b, t, expected = _crop(rng, bd, size, fc, bank, defect)
    return x, b, t, find_focus(b, expected)


def _crop(rng, bd, size, fc, bank, defect):
    k = rng.randrange(8)
    img, boxes = dihedral(bd.img, bd.boxes, k)
    H, W = img.shape[-2:]
    side = size  # the board area read, resized to ``size`` when scale-jittered
    if fc is not None and fc.scale_jitter > 0:
        j = math.log1p(fc.scale_jitter)
        side = min(H, W, round(size / math.exp(rng.uniform(-j, j))))
    if defect is not None or (len(boxes) and rng.random() < 0.7):
        x1, y1, x2, y2 = boxes[defect if defect is not None else rng.randrange(len(boxes))]
        r = 0.3 if defect is not None else 0.4   # a focused defect stays well inside
        cx, cy = (x1 + x2) / 2 + rng.uniform(-side * r, side * r), \
            (y1 + y2) / 2 + rng.uniform(-side * r, side * r)
        x0 = int(np.clip(cx - side / 2, 0, W - side))
        y0 = int(np.clip(cy - side / 2, 0, H - side))
    else:
        x0, y0 = rng.randrange(W - side + 1), rng.randrange(H - side + 1)
    out, b, t = crop(img, boxes, bd.types, x0, y0, side)
    expected = None
    if defect is not None:
        expected = np.clip(boxes[defect] - np.array([x0, y0, x0, y0], np.float32), 0, side)
        expected = expected * (size / side)
    if side != size:
        out, b = scale_pair(out, b, size / side)
    if fc is not None and fc.p_line > 0 and rng.random() < fc.p_line:
        out = line_width(out, rng.choice((-1, 1)))
        b, t = still_different(out, b, t)
    if bank is not None and fc is not None and rng.random() < fc.p_paste:
        out, b, t = paste_defects(out, b, t, bank, rng, rng.randint(1, 2))
    if fc is not None and fc.p_etch > 0 and rng.random() < fc.p_etch:  # no draw when off
        out, b, t = capture_etch(out, b, t, rng)
    if fc is not None and fc.p_etch_local > 0 and rng.random() < fc.p_etch_local:
        out, b, t = capture_etch_local(out, b, t, rng)
    if fc is not None and fc.p_noise > 0 and rng.random() < fc.p_noise:
        out = capture_noise(out, rng, fc.noise_sigma_max)
    if fc is not None and fc.p_blur > 0 and rng.random() < fc.p_blur:
        out = capture_blur(out, rng, fc.blur_radius_max)
    return _to_input(out), b, t, expected


def train_vision(model: PcbVlm, boards: list[Board8], fc: FinetuneConfig, logf,
                 ckpt: StageCheckpoint | None = None) -> None:
    rng = random.Random(fc.seed)
    bank = DefectBank(boards) if fc.p_paste > 0 else None
    v = model.vision
    v.train()
    opt = torch.optim.AdamW(v.parameters(), lr=fc.lr_a, weight_decay=1e-4)
    hard = DefectDifficulty([len(bd.boxes) for bd in boards]) if fc.hard_mining > 0 else None
    state = {"vision": v} if hard is None else {"vision": v, "hard": hard}
    step, spent = ckpt.restore(state, opt, [rng]) if ckpt else (0, 0.0)
    t0, budget = time.time() - spent, fc.minutes_a * 60
    stride = model.cfg.vision.stride
    bar = tqdm(total=int(budget), initial=int(spent), desc="stage A: vision (s)", unit="s",
               leave=True)
    last = int(spent)
    while step < fc.steps_a and time.time() - t0 < budget:
        frac = (time.time() - t0) / budget
        for g in opt.param_groups:
            g["lr"] = fc.lr_a * (0.5 * (1 + math.cos(math.pi * min(frac, 1.0)))) * min(1, (step + 1) / 100)
        xs, bxs, tys, focus = [], [], [], []
        for _ in range(fc.batch_a):
            if hard is not None and rng.random() < fc.hard_mining:
                bi, di = hard.pick(rng)
                x, b, t, j = sample_focused_crop(rng, boards[bi], di, fc.crop, fc, bank)
                focus.append((len(xs), bi, di, j))
            else:
                x, b, t = sample_crop(rng, boards[rng.randrange(len(boards))], fc.crop, fc, bank)
            xs.append(x), bxs.append(b), tys.append(t)
        x = torch.from_numpy(np.stack(xs))
        hs = fc.crop // stride
        heat_t, box_t, box_m = heatmap_targets(bxs, tys, hs, hs, stride)
        _, _, heat, box = v.dense(x)
        focal, l1 = detection_loss(heat, box, heat_t, box_t, box_m)
        for i, bi, di, j in focus:
            if j >= 0:
                hard.update(bi, di, centre_prob(heat, i, bxs[i][j], int(tys[i][j]), stride))
        loss = focal + l1
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(v.parameters(), 5.0)
        opt.step()
        step += 1
        if step % 25 == 0:
            rec = {"stage": "A", "step": step, "s": round(time.time() - t0, 1),
                   "focal": round(focal.item(), 4), "box_l1": round(l1.item(), 4)}
            logf.write(json.dumps(rec) + "\n"), logf.flush()
            bar.set_postfix(focal=f"{focal.item():.3f}", box=f"{l1.item():.3f}", step=step)
        if ckpt:
            ckpt.maybe_save(state, opt, [rng], step, time.time() - t0)
        now = int(time.time() - t0)
        bar.update(now - last)
        last = now
    bar.close()
    v.eval()


@torch.no_grad()
def calibration_pairs(model: PcbVlm, boards: list[Board8], seed: int) -> tuple[list, list]:
    """The board pass on validation boards (every question's confidences come from it);
    (raw logp, correct) pairs, the raw log-probability read from the decoding state."""
    from pcbedge.families.pcbvlm.model.quality import is_correct
    logps, correct = [], []
    for bd in tqdm(boards, desc="stage C: calibration answers", unit="board"):
        enc = model.encode_image(torch.from_numpy(_to_input(bd.img)).unsqueeze(0))
        boxes = enc["region_boxes"][0].numpy()
        state, _ = model.board_pass(enc)
        used: set = set()
        for t, k, logp in state.defects:
            d = {"type": t, "bbox": boxes[k].tolist()}
            logps.append(logp), correct.append(is_correct(d, bd.boxes, bd.types, used))
    return logps, correct


def _stage_done(folder: Path, ckpt: StageCheckpoint, fc: FinetuneConfig) -> bool:
    """Resuming, a stage whose checkpoint folder was saved and that left no resume state is
    done; a checkpoint of a run with other settings is refused, not trained on."""
    if not fc.resume or ckpt.path.exists() or not (folder / "config.json").exists():
        return False
    try:
        saved = json.loads((folder / "generation_config.json").read_text()).get("stage_settings")
    except (OSError, ValueError):
        saved = None
    refuse_other_settings(folder, saved, fc.settings())
    log.info("resume: %s is done, loading it", folder.name)
    return True


@torch.no_grad()
def with_tokenizer(model: PcbVlm, tok) -> PcbVlm:
    """``model`` moved onto the vocabulary of ``tok``: rows of known tokens are copied, a new
    word starts as the mean of the rows of the pieces the old tokenizer split it into."""
    old_tok = model.tokenizer
    old, new = old_tok.get_vocab(with_added_tokens=True), tok.get_vocab(with_added_tokens=True)
    if old == new:
        return model
    text = replace(model.cfg.text, vocab_size=len(new))
    fresh = PcbVlm(replace(model.cfg, text=text), tok, model.calibration)
    skip = ("decoder.tok.weight", "decoder.lm.weight", "decoder.lm.bias")
    fresh.load_state_dict({k: v for k, v in model.state_dict().items() if k not in skip},
                          strict=False)
    d_old, d_new = model.decoder, fresh.decoder
    n_old = model.cfg.text.text_vocab   # the old rows: pointer tokens have none
    for token, i in new.items():
        if i >= text.text_vocab:
            continue  # region pointer tokens: no rows
        rows = [old[token]] if token in old and old[token] < n_old else \
            [j for j in old_tok.encode(token, add_special_tokens=False).ids if j < n_old]
        if not rows:
            continue
        d_new.tok.weight[i] = d_old.tok.weight[rows].mean(0)
        d_new.lm.weight[i] = d_old.lm.weight[rows].mean(0)
        d_new.lm.bias[i] = d_old.lm.bias[rows].mean(0)
    return fresh.eval()


def finetune(data_dir, out_dir, fc: FinetuneConfig = FinetuneConfig(), list_file="trainval.txt"):
    """Train the reference model from scratch on the train part of ``data_dir``'s trainval list;
    calibrate on the validation part; save in the Hugging Face layout to ``out_dir``."""
    from pcbedge.families.pcbvlm.model.quality import calibrate_quality
    from pcbedge.families.pcbvlm.model.train_lm import cache_vision, fit_platt, train_decoder
    if fc.split not in ("trainval", "designs"):
        raise DatasetError(f"split {fc.split!r} is not 'trainval' or 'designs'",
                           fix="FinetuneConfig(split='trainval') or split='designs' "
                               "(docs/data.md)")
    out = Path(out_dir)
    ck = {st: StageCheckpoint(out, st, fc.checkpoint_minutes, fc.settings(), fc.resume)
          for st in ("stage_a", "stage_b")}
    done_a = _stage_done(out / "checkpoint_stage_a", ck["stage_a"], fc)   # refused before
    done_b = done_a and _stage_done(out / "checkpoint_stage_b", ck["stage_b"], fc)   # any work
    for c in ck.values():
        c.check()
    torch.manual_seed(fc.seed)
    torch.set_num_threads(fc.threads)
    random.seed(fc.seed), np.random.seed(fc.seed)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.time()
    boards = read_list(data_dir, list_file)
    if fc.split == "designs":
        train_b, _, val_b = split_designs(boards)
    else:
        train_b, val_b = split_trainval(boards)
    if fc.init_from:  # continue from a saved model: its config and weights, today's vocabulary
        saved = PcbVlm.from_pretrained(fc.init_from)   # its own region-token count, not today's
        model = with_tokenizer(saved, build_tokenizer(vocabulary_corpus(),
                                                      saved.cfg.vision.num_regions))
        model.calibration = {"a": 1.0, "b": 0.0}
        cfg = model.cfg
    else:
        tok = build_tokenizer(vocabulary_corpus(), PcbVlmConfig().vision.num_regions)
        cfg = PcbVlmConfig(text=TextConfig(vocab_size=tok.get_vocab_size()))
        model = PcbVlm(cfg, tok)
    train = [Board8(b, cfg.input_size) for b in tqdm(train_b, desc="loading train boards")]
    val = [Board8(b, cfg.input_size) for b in tqdm(val_b, desc="loading validation boards")]
    with open(out / "train_log.jsonl", "a" if fc.resume else "w") as logf:
        if done_a:
            model = PcbVlm.from_pretrained(out / "checkpoint_stage_a")
        else:
            if fc.minutes_a > 0:
                train_vision(model, train, fc, logf, ck["stage_a"])
            model.save_pretrained(out / "checkpoint_stage_a",
                                  extra_generation={"stage_settings": fc.settings()})
            ck["stage_a"].finish()
        if done_b:
            model = PcbVlm.from_pretrained(out / "checkpoint_stage_b")
        elif fc.minutes_b <= 0:   # a vision-only run: the language side stays as it came
            pass
        else:
            items = cache_vision(model, train, fc.n_dihedral, fc.match_iou)
            train_decoder(model, items, fc, logf, ck["stage_b"])
            del items
            model.save_pretrained(out / "checkpoint_stage_b",
                                  extra_generation={"stage_settings": fc.settings()})
            ck["stage_b"].finish()
        logps, correct = calibration_pairs(model, val, fc.seed)
        model.calibration = fit_platt(logps, correct)
        logf.write(json.dumps({"stage": "C", **model.calibration}) + "\n")
        if fc.quality_calibration:
            block = calibrate_quality(model, val, fc.seed)
            logf.write(json.dumps({"stage": "C2", **block}) + "\n")
    info = {"finetune_config": asdict(fc), "train_boards": len(train), "val_boards": len(val),
            "minutes": round((time.time() - t_start) / 60, 1), "torch_threads": fc.threads,
            "split": fc.split, "calibration_groups": sorted({b.group for b in val_b})}
    model.save_pretrained(out, extra_generation={"training": info})
    return model, info
