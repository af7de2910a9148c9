"""Stage B (projector + decoder on cached vision outputs) and stage C (confidence calibration)."""
from __future__ import annotations

import json
import math
import random
import time

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from pcbedge.data.deeppcb import DEFECT_TYPES
from pcbedge.data.qa import QA, QuestionGenerator
from pcbedge.data.qa_kinds import insert_unknown_word
from pcbedge.families.pcbvlm.model.augment import dihedral
from pcbedge.data.query import Program
from pcbedge.families.pcbvlm.program import program_visual_tokens
from pcbedge.families.pcbvlm.tokenizer import encode_question_numbers
from pcbedge.geometry import iou_matrix

IGNORE = -100


def match_regions(prop_boxes: np.ndarray, gt_boxes: np.ndarray, gt_types: np.ndarray,
                  thr: float) -> np.ndarray:
    """Greedy one-to-one matching by IoU; returns the GT type id per proposal, -1 if none."""
    out = np.full(len(prop_boxes), -1, np.int64)
    m = iou_matrix(prop_boxes, gt_boxes)
    used_p, used_g = set(), set()
    for flat in np.argsort(-m, axis=None):
        p, g = divmod(int(flat), m.shape[1])
        if m[p, g] < thr:
            break
        if p in used_p or g in used_g:
            continue
        used_p.add(p), used_g.add(g)
        out[p] = gt_types[g]
    return out


@torch.no_grad()
def cache_vision(model, boards, n_dihedral: int, thr: float) -> list[dict]:
    """Run the frozen vision encoder on whole boards under dihedral transforms."""
    from pcbedge.families.pcbvlm.model.train import _to_input
    items = []
    for bd in tqdm(boards, desc="stage B: caching vision outputs", unit="board"):
        xs, gts = [], []
        for k in range(n_dihedral):
            img, boxes = dihedral(bd.img, bd.boxes, k)
            xs.append(_to_input(img)), gts.append(boxes)
        c32, boxes, scores, raw, _, _ = model.vision(torch.from_numpy(np.stack(xs)))
        for i in range(n_dihedral):
            items.append({"c32": c32[i].clone(), "raw": raw[i].clone(),
                          "match": match_regions(boxes[i].numpy(), gts[i], bd.types, thr)})
    return items


def answer_ids(spec: dict, qa: QA, match: np.ndarray, rng: random.Random | None = None
               ) -> list[int]:
    """The target answer sequence for a question, given the proposals' matched types. With
    ``rng`` the defects come in a random order (the set-based pointer loss needs it: in
    proposal order the decoder learns "nothing is left above the last index I reported",
    which its own free-order decoding then breaks); without, in proposal order."""
    if qa.kind == "unsupported":
        return [spec["intents"]["unsupported"], spec["eos"]]
    filt = qa.filter or "all"
    ids = [spec["intents"][qa.kind], spec["filters"][filt]]
    order = [int(k) for k in np.nonzero(match >= 0)[0]]
    if rng is not None:
        rng.shuffle(order)
    for k in order:
        t = DEFECT_TYPES[int(match[k])]
        if filt == "all" or t == filt:
            ids += [spec["region_offset"] + int(k), spec["types"][t]]
    return ids + [spec["eos"]]


def program_ids(spec: dict, program: Program) -> list[int]:
    """The program pass's target: INTENT FILTERS SCOPE SLOT* ORDER <eos> (program.py)."""
    if program.intent == "unsupported":
        return [spec["intents"]["unsupported"], spec["eos"]]
    p = spec["program"]
    ids = [spec["intents"][program.intent]]
    ids += [spec["filters"][t] for t in program.types] or [spec["filters"]["all"]]
    ids += [p["scopes"][program.scope]] + [p["slots"][i] for i in program.slots]
    return ids + [p["orders"][program.order], spec["eos"]]


def make_batch(model, items, rng: random.Random, gen: QuestionGenerator, fc, max_q: int,
               board: bool | None = None):
    """Token ids, labels, the vision cache and ``targets`` [B,T,K]: at each REGION label, every
    proposal still to be reported (the set-based pointer target: region tokens carry no index,
    so any unreported true region is a right next answer).

    A batch is of board passes (a describe-all question, then ``<q_describe> <f_all>`` and the
    board's regions) or of program passes (``question <prog>`` then the question's program,
    over every question kind); ``board`` None mixes them, a share ``fc.p_board`` of boards."""
    spec, tok = model.spec, model.tokenizer
    unk = tok.token_to_id("[UNK]")
    off, K = spec["region_offset"], spec["num_regions"]
    seqs, labels, c32, raw = [], [], [], []
    for _ in range(fc.batch_b):
        it = items[rng.randrange(len(items))]
        present = {DEFECT_TYPES[int(t)] for t in it["match"] if t >= 0}
        is_board = rng.random() < fc.p_board if board is None else board
        qa = gen.describe() if is_board else gen.sample_program(present)
        question = qa.question
        if fc.word_insert and rng.random() < fc.word_insert:
            question = insert_unknown_word(question, rng,
                                           lambda w: tok.token_to_id(w) is not None)
        q, _ = encode_question_numbers(tok, question, max_q)
        q = [q[0]] + [unk if rng.random() < fc.word_dropout and t < spec["region_offset"]
                      and t not in spec["program"]["slots"] else t for t in q[1:-1]] + [q[-1]]
        if is_board:
            a = answer_ids(spec, qa, it["match"], rng if fc.set_pointer_loss else None)
            s, lab = q + a, [IGNORE] * (len(q) - 1) + a
        else:
            a = program_ids(spec, qa.meaning())
            s, lab = q + [spec["program"]["prog"]] + a, [IGNORE] * len(q) + a
        seqs.append(s[:-1])
        labels.append(lab)
        c32.append(it["c32"]), raw.append(it["raw"])
    n = max(len(s) for s in seqs)
    pad = spec["pad"]
    ids = torch.tensor([s + [pad] * (n - len(s)) for s in seqs])
    lab = torch.tensor([l + [IGNORE] * (n - len(l)) for l in labels])
    targets = torch.zeros(len(seqs), n, K, dtype=torch.bool)
    for b, l in enumerate(labels):
        pos = [t for t, v in enumerate(l) if v >= off]
        for j, t in enumerate(pos):
            for t2 in pos[j:]:
                targets[b, t, l[t2] - off] = True
    return ids, lab, torch.stack(c32), torch.stack(raw), targets


def pointer_set_loss(logits: torch.Tensor, targets: torch.Tensor, lab: torch.Tensor,
                     off: int) -> torch.Tensor:
    """Per position: -log of the probability mass on the allowed next regions, where the label
    is a REGION; elsewhere 0. logits [B,T,V+K], targets [B,T,K]."""
    lse_all = torch.logsumexp(logits, dim=-1)
    ptr = logits[..., off:].masked_fill(~targets, float("-inf"))
    lse_ok = torch.logsumexp(ptr, dim=-1)
    is_reg = lab >= off
    return torch.where(is_reg, lse_all - torch.where(is_reg, lse_ok, lse_all), 0.0)


def part_of(spec: dict) -> dict[int, str]:
    parts = {v: "intent" for v in spec["intents"].values()}
    parts.update({v: "filter" for v in spec["filters"].values()})
    parts.update({v: "type" for v in spec["types"].values()})
    parts[spec["eos"]] = "eos"
    p = spec.get("program", {})
    for v in list(p.get("scopes", {}).values()) + list(p.get("orders", {}).values()) + \
            list(p.get("slots", [])):
        parts[v] = "program"
    return parts


def train_decoder(model, items, fc, logf, ckpt=None) -> None:
    rng = random.Random(fc.seed + 1)
    torch.manual_seed(fc.seed + 1)
    gen = QuestionGenerator(seed=fc.seed + 1, split="train", fillers=True)
    params = list(model.projector.parameters()) + list(model.decoder.parameters())
    opt = torch.optim.AdamW(params, lr=fc.lr_b, weight_decay=0.01)
    model.projector.train(), model.decoder.train()
    spec = model.spec
    parts = part_of(spec)
    max_q = model.cfg.text.max_text_len // 2
    modules = {"projector": model.projector, "decoder": model.decoder}
    step, spent = ckpt.restore(modules, opt, [rng, gen.rng]) if ckpt else (0, 0.0)
    t0, budget, last = time.time() - spent, fc.minutes_b * 60, int(spent)
    bar = tqdm(total=int(budget), initial=int(spent), desc="stage B: language (s)", unit="s")
    while step < fc.steps_b and time.time() - t0 < budget:
        frac = (time.time() - t0) / budget
        for g in opt.param_groups:
            g["lr"] = fc.lr_b * 0.5 * (1 + math.cos(math.pi * min(frac, 1.0))) * min(1, (step + 1) / 100)
        board = rng.random() < fc.p_board
        ids, lab, c32, raw, targets = make_batch(model, items, rng, gen, fc, max_q, board)
        vis, reg = model.projector(c32, raw)
        n_vis = vis.shape[1]
        if board:
            # visual-token dropout; mostly short prefixes (the region tokens carry the
            # evidence), which also makes a step ~3x cheaper; 15% of batches see every token
            keep = n_vis if rng.random() < 0.15 else max(8, int(n_vis * rng.uniform(0.05, 0.5)))
            idx = torch.stack([torch.randperm(n_vis)[:keep].sort().values
                               for _ in range(len(ids))])
        else:   # the program pass reads the question with the fixed few visual tokens
            idx = torch.as_tensor(program_visual_tokens(n_vis)).unsqueeze(0).expand(len(ids), -1)
            keep = idx.shape[1]
        vis = torch.gather(vis, 1, idx.unsqueeze(2).expand(-1, -1, vis.shape[2]))
        logits = model.decoder.forward_full(vis, reg, ids)
        loss_all = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), lab.reshape(-1),
                                   ignore_index=IGNORE, reduction="none").reshape(lab.shape)
        if fc.set_pointer_loss:
            loss_all = torch.where(lab >= spec["region_offset"],
                                   pointer_set_loss(logits, targets, lab, spec["region_offset"]),
                                   loss_all)
        valid = lab != IGNORE
        loss = loss_all[valid].mean()
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        step += 1
        if step % 25 == 0:
            rec = {"stage": "B", "step": step, "s": round(time.time() - t0, 1),
                   "loss": round(loss.item(), 4), "keep": keep}
            for name in ("intent", "filter", "program", "type", "eos", "region"):
                sel = valid & _is_part(lab, parts, name, spec)
                if sel.any():
                    rec[name] = round(loss_all[sel].mean().item(), 4)
            logf.write(json.dumps(rec) + "\n"), logf.flush()
            bar.set_postfix(loss=f"{loss.item():.3f}", step=step)
        if ckpt:
            ckpt.maybe_save(modules, opt, [rng, gen.rng], step, time.time() - t0)
        now = int(time.time() - t0)
        bar.update(now - last)
        last = now
    bar.close()
    model.eval()


def _is_part(lab, parts, name, spec):
    if name == "region":
        return lab >= spec["region_offset"]
    ids = [k for k, v in parts.items() if v == name]
    return torch.isin(lab, torch.tensor(ids))


def fit_platt(logps: list[float], correct: list[bool], iters: int = 200) -> dict:
    """Fit conf = sigmoid(a * logit(p) + b) by damped Newton steps on the L2-penalised
    log-likelihood (a backtracking line search keeps it from running off on nearly
    separable data)."""
    from pcbedge.families.pcbvlm.grammar import logit_of_logp
    if len(logps) < 10 or all(correct) or not any(correct):
        return {"a": 1.0, "b": 0.0, "n": len(logps), "method": "identity (too few / one class)"}
    z = np.array([logit_of_logp(lp) for lp in logps], np.float64)
    y = np.array(correct, np.float64)
    X = np.stack([z, np.ones_like(z)], 1)
    lam = 1e-3

    def nll(w):
        t = X @ w
        return float(np.sum(np.logaddexp(0.0, t) - y * t) + 0.5 * lam * w @ w)

    w = np.array([1.0, 0.0])
    for _ in range(iters):
        q = 1 / (1 + np.exp(-(X @ w)))
        g = X.T @ (q - y) + lam * w
        H = X.T @ (X * (q * (1 - q))[:, None]) + lam * np.eye(2)
        step = np.linalg.solve(H, g)
        t, f0 = 1.0, nll(w)
        while t > 1e-6 and nll(w - t * step) > f0:
            t *= 0.5
        w -= t * step
        if np.abs(t * step).max() < 1e-9:
            break
    return {"a": float(w[0]), "b": float(w[1]), "n": len(logps), "method": "platt on logit(p)"}
