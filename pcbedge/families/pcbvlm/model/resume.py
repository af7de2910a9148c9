"""Periodic checkpoints of a time-budgeted training stage, so that a run killed part-way (the end
of a session, a reboot, SIGKILL) continues where it stopped instead of starting again.

Every ``every_minutes`` the stage writes ``OUT/<stage>.resume.pt``: the trained modules' weights,
the optimizer's state, the step, the seconds of budget spent, and every random stream the stage
draws from (Python ``random.Random`` objects and torch's CPU generator). It is written through
pcbedge's one writer (``bundle.atomic.atomic_path``), so a kill during the save leaves the
previous state and a full disk is an OutputError naming the file.
``finetune(resume=True)`` restores it and the stage goes on with the same learning-rate schedule
(its cosine runs over budget seconds, and the spent seconds come back) and the same draws it
would have made had it not been killed at that save; the file is removed when the stage ends.
The state records the run's settings; resuming with different ones is refused.
"""
from __future__ import annotations

import logging
import random
import time
from pathlib import Path

import torch

from pcbedge.bundle.atomic import atomic_path
from pcbedge.errors import ModelError

log = logging.getLogger(__name__)


class StageCheckpoint:
    def __init__(self, out: Path, stage: str, every_minutes: float, settings: dict,
                 resume: bool):
        self.path = Path(out) / f"{stage}.resume.pt"
        self.stage, self.every_s = stage, float(every_minutes) * 60.0
        self.settings, self.resume = dict(settings), resume
        self._last = time.time()
        self._state: dict | None = None   # read once, by check() or restore()

    def check(self) -> None:
        """Resuming from a state saved with other settings: refused before any work starts."""
        if self.resume and self.path.exists():
            self._load()

    def _load(self) -> dict:
        if self._state is not None:
            return self._state
        try:
            st = torch.load(self.path, map_location="cpu", weights_only=False)
        except Exception as e:   # a truncated or foreign file: say which, destroy nothing
            raise ModelError(f"cannot read the resume state {self.path}: {type(e).__name__}: {e}",
                             fix="delete it to start the stage again") from None
        refuse_other_settings(self.path, st.get("settings") if isinstance(st, dict) else None,
                              self.settings)
        self._state = st
        return st

    def restore(self, modules: dict, opt, rngs: list[random.Random]) -> tuple[int, float]:
        """(step, spent seconds) of the saved state loaded into ``modules``, ``opt`` and
        ``rngs``; (0, 0.0) when not resuming or there is nothing to resume."""
        if not self.resume or not self.path.exists():
            if self.resume:
                log.info("%s: nothing to resume in %s, starting the stage", self.stage,
                         self.path.parent)
            return 0, 0.0
        st, self._state = self._load(), None
        for name, m in modules.items():
            m.load_state_dict(st["modules"][name])
        opt.load_state_dict(st["optimizer"])
        for r, s in zip(rngs, st["rngs"]):
            r.setstate(s)
        torch.set_rng_state(st["torch_rng"])
        log.info("%s: resumed at step %d, %.0f s of budget spent", self.stage, st["step"],
                 st["spent_s"])
        return int(st["step"]), float(st["spent_s"])

    def maybe_save(self, modules: dict, opt, rngs: list[random.Random], step: int,
                   spent_s: float) -> bool:
        if self.every_s <= 0 or time.time() - self._last < self.every_s:
            return False
        st = {"settings": self.settings, "step": step, "spent_s": spent_s,
              "modules": {k: m.state_dict() for k, m in modules.items()},
              "optimizer": opt.state_dict(), "rngs": [r.getstate() for r in rngs],
              "torch_rng": torch.get_rng_state()}
        with atomic_path(self.path) as tmp:
            torch.save(st, tmp)
        self._last = time.time()
        return True

    def finish(self) -> None:
        """The stage ended: its state has served."""
        self.path.unlink(missing_ok=True)


def refuse_other_settings(path: Path, saved, now: dict) -> None:
    """A ModelError naming the settings that differ, when ``saved`` is not ``now``."""
    if saved == now:
        return
    saved = saved if isinstance(saved, dict) else {}
    diff = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k))
    raise ModelError(f"{path} was saved by a run with other settings (differing: "
                     f"{', '.join(diff) or 'none recorded'})",
                     fix="resume with the same options, or train into a new folder (or leave "
                         "out --resume to start again there)")
