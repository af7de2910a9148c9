"""Language side of the reference PCB VLM: a small pre-LN transformer decoder.

The prefix (visual tokens, then region tokens) is visible to every position; text is causal.
Logits cover the text vocabulary plus K pointer logits, one per region token, so ``<r_k>`` is
scored against the k-th proposal's own token. An emitted ``<r_k>`` is fed back as that region's
token, so the decoder knows which evidence it has already reported.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from pcbedge.families.pcbvlm.model.config import TextConfig


class Block(nn.Module):
    def __init__(self, c: TextConfig):
        super().__init__()
        self.h, self.hd = c.n_heads, c.d_model // c.n_heads
        self.ln1 = nn.LayerNorm(c.d_model)
        self.qkv = nn.Linear(c.d_model, 3 * c.d_model)
        self.proj = nn.Linear(c.d_model, c.d_model)
        self.ln2 = nn.LayerNorm(c.d_model)
        self.ff = nn.Sequential(nn.Linear(c.d_model, c.d_ff), nn.GELU(), nn.Linear(c.d_ff, c.d_model))

    def forward(self, x, bias, past_k=None, past_v=None):
        """x [B,T,D]; bias additive [B|1,1,T,S] or None; returns x and this layer's full k, v."""
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(d, dim=2)
        q = q.reshape(b, t, self.h, self.hd).transpose(1, 2)
        k = k.reshape(b, t, self.h, self.hd).transpose(1, 2)
        v = v.reshape(b, t, self.h, self.hd).transpose(1, 2)
        if past_k is not None:
            k = torch.cat([past_k, k], dim=2)
            v = torch.cat([past_v, v], dim=2)
        att = (q @ k.transpose(2, 3)) * (1.0 / math.sqrt(self.hd))
        if bias is not None:
            att = att + bias
        y = (att.softmax(-1) @ v).transpose(1, 2).reshape(b, t, d)
        x = x + self.proj(y)
        return x + self.ff(self.ln2(x)), k, v


class Decoder(nn.Module):
    def __init__(self, c: TextConfig):
        super().__init__()
        self.c = c
        self.tok = nn.Embedding(c.text_vocab, c.d_model)
        self.pos = nn.Embedding(c.max_text_len, c.d_model)
        self.type_vis = nn.Parameter(torch.zeros(c.d_model))
        self.type_reg = nn.Parameter(torch.zeros(c.d_model))
        self.ptr_in = nn.Parameter(torch.zeros(c.d_model))
        self.blocks = nn.ModuleList(Block(c) for _ in range(c.n_layers))
        self.ln = nn.LayerNorm(c.d_model)
        self.lm = nn.Linear(c.d_model, c.text_vocab)
        self.ptr_q = nn.Linear(c.d_model, c.d_model)
        self.ptr_k = nn.Linear(c.d_model, c.d_model)
        nn.init.normal_(self.pos.weight, std=0.02)
        nn.init.normal_(self.tok.weight, std=0.02)

    def embed_ids(self, ids, positions, regions):
        """Token ids (text or region pointers) -> embeddings [B,T,D]."""
        V = self.c.text_vocab
        is_reg = ids >= V
        t = self.tok(ids.clamp(max=V - 1))
        ridx = (ids - V).clamp(min=0)
        r = torch.gather(regions, 1, ridx.unsqueeze(2).expand(-1, -1, regions.shape[2]))
        e = torch.where(is_reg.unsqueeze(2), r + self.ptr_in, t)
        return e + self.pos(positions)

    def logits(self, h, regions):
        """h [B,T,D] -> [B,T,V_text+K]."""
        h = self.ln(h)
        q = self.ptr_q(h)
        k = self.ptr_k(regions)
        ptr = (q @ k.transpose(1, 2)) * (1.0 / math.sqrt(self.c.d_model))
        return torch.cat([self.lm(h), ptr], dim=2)

    def prefix(self, vis, regions):
        return torch.cat([vis + self.type_vis, regions + self.type_reg], dim=1)

    def forward_full(self, vis, regions, ids, prefix_pad=None):
        """Training / reference path: all positions, no cache. ``prefix_pad`` [B,P] True = drop."""
        pre = self.prefix(vis, regions)
        b, p, _ = pre.shape
        t = ids.shape[1]
        pos = torch.arange(t, device=ids.device).unsqueeze(0).expand(b, t)
        x = torch.cat([pre, self.embed_ids(ids, pos, regions)], dim=1)
        bias = prefix_lm_bias(p, t, x.device)
        if prefix_pad is not None:
            pad = torch.cat([prefix_pad, torch.zeros(b, t, dtype=torch.bool, device=x.device)], 1)
            bias = bias + pad[:, None, None, :].to(x.dtype) * -1e9
        for blk in self.blocks:
            x, _, _ = blk(x, bias)
        return self.logits(x[:, p:], regions)

    def prefill(self, vis, regions, ids):
        """Prefix + question in one pass -> last-position logits and the stacked KV cache
        [L, 2, B, H, P+T, hd]."""
        pre = self.prefix(vis, regions)
        b, p, _ = pre.shape
        t = ids.shape[1]
        pos = torch.arange(t, device=ids.device).unsqueeze(0).expand(b, t)
        x = torch.cat([pre, self.embed_ids(ids, pos, regions)], dim=1)
        bias = prefix_lm_bias(p, t, x.device)
        kv = []
        for blk in self.blocks:
            x, k, v = blk(x, bias)
            kv.append(torch.stack([k, v]))
        return self.logits(x[:, -1:], regions)[:, 0], torch.stack(kv)

    def step(self, ids, positions, regions, past):
        """One token with the cache: ids [B,1], positions [B,1] -> logits [B,V+K], new cache."""
        x = self.embed_ids(ids, positions, regions)
        kv = []
        for i, blk in enumerate(self.blocks):
            x, k, v = blk(x, None, past[i, 0], past[i, 1])
            kv.append(torch.stack([k, v]))
        return self.logits(x, regions)[:, 0], torch.stack(kv)


def prefix_lm_bias(p, t, device):
    """Additive mask [1,1,P+T,P+T]: key j visible to query i iff j < P or j <= i."""
    n = p + t
    i = torch.arange(n, device=device).unsqueeze(1)
    j = torch.arange(n, device=device).unsqueeze(0)
    ok = (j < p) | (j <= i)
    return torch.where(ok, 0.0, -1e9).reshape(1, 1, n, n)
