"""Visual-token pruning between the vision graph and the decoder prefill (numpy, torch-free).

The vision graph scores every visual token twice: ``token_prior`` (the defect head's strongest
heat in the token's cell) and ``token_diff`` (mean |test - template| in the cell). Pruning keeps
the best-scored tokens and drops the rest before the prefill, which shortens the prefix and the
KV cache. Kept tokens stay in their original order: their 2-D positions are already added into
the tokens by the vision graph, so a token means the same wherever it ends up in the prefix.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

from pcbedge.errors import TargetError

# feature_norm: the norm of each visual token (for bundles whose vision graph exports no
# token score of its own); computed by the runner, not by a graph
METHODS = ("none", "model_prior", "template_diff", "feature_norm")
# which graph output scores the tokens for each method is the family's: its manifest's
# ``token_scores`` map (method -> output name)


@dataclass(frozen=True)
class TokenPruningConfig:
    """Keep ``max(min_tokens, ceil(keep_ratio * N))`` of the N visual tokens (at most N)."""

    method: str = "none"
    keep_ratio: float = 1.0
    min_tokens: int = 16

    def __post_init__(self):
        if self.method not in METHODS:
            raise TargetError(f"token pruning method {self.method!r} is unknown",
                              fix=f"use one of: {', '.join(METHODS)}")
        r = self.keep_ratio
        if (isinstance(r, bool) or not isinstance(r, (int, float)) or math.isnan(r)
                or not 0.0 < r <= 1.0):
            raise TargetError(f"token pruning keep_ratio {r!r} is outside (0, 1]",
                              fix="use a fraction of the visual tokens to keep, e.g. 0.5; "
                                  "1.0 keeps all")
        m = self.min_tokens
        if isinstance(m, bool) or not isinstance(m, int) or m < 1:
            raise TargetError(f"token pruning min_tokens {m!r} is not a positive integer",
                              fix="use e.g. 16")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict | None) -> "TokenPruningConfig":
        """``None`` (a manifest without pruning) means no pruning."""
        if d is None:
            return cls()
        if not isinstance(d, dict):
            raise TargetError(f"token pruning must be a mapping, got {type(d).__name__}",
                              fix="use {method: ..., keep_ratio: ..., min_tokens: ...}")
        unknown = sorted(set(d) - {"method", "keep_ratio", "min_tokens"})
        if unknown:
            raise TargetError(f"token pruning has unknown fields {unknown}",
                              fix="valid fields: method, keep_ratio, min_tokens")
        return cls(**d)

    @property
    def enabled(self) -> bool:
        return self.method != "none"


def token_budget(n: int, config: TokenPruningConfig) -> int:
    """How many of ``n`` visual tokens ``config`` keeps."""
    if not config.enabled:
        return n
    return int(min(n, max(config.min_tokens, math.ceil(config.keep_ratio * n - 1e-9))))


def select_tokens(scores: np.ndarray, config: TokenPruningConfig) -> np.ndarray:
    """Indices (int64, ascending) of the visual tokens to keep, the best ``token_budget`` by
    score; ties go to the earlier token, NaN scores rank last."""
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    n = s.shape[0]
    k = token_budget(n, config)
    if k >= n:
        return np.arange(n, dtype=np.int64)
    s = np.where(np.isnan(s), -np.inf, s)
    order = np.argsort(-s, kind="stable")[:k]
    return np.sort(order).astype(np.int64)


def as_pruning_config(value) -> TokenPruningConfig:
    """Accept a TokenPruningConfig, its dict form or None."""
    if isinstance(value, TokenPruningConfig):
        return value
    return TokenPruningConfig.from_dict(value)
