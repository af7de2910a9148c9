"""``bench --resume``: every board's answers kept as they are made, reused by a rerun.

A bench on a slow device (an emulated ARM userland, a small Jetson CPU, hundreds of boards) can
run for hours; a stop (a CI runner's timeout, a reboot) should cost one board, not the run.
With ``resume``, the accuracy passes of the bundle and of its FP32 reference append one line
per board to ``OUT/answers/<role>.jsonl`` and a rerun into the same ``OUT`` answers only the
boards not yet there. A line is reused only when its key matches: the sha256 of the model's
manifest, the board's two image files (name and size) and its exact questions, so a rebuilt
bundle, another board list or another question seed is answered afresh. The timed latency pass
is never cached. A line torn by a kill is ignored (that board is answered again).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path

from pcbedge.benchmarks.environment import manifest_sha256
from pcbedge.bundle.outputs import ANSWER_CACHE_FOLDER as FOLDER
from pcbedge.bundle.outputs import ANSWER_CACHE_HEADER as HEADER


def _finite(obj) -> bool:
    if isinstance(obj, float):
        return math.isfinite(obj)
    if isinstance(obj, dict):
        return all(_finite(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return all(_finite(v) for v in obj)
    return True


def _last_byte(path: Path) -> bytes:
    with open(path, "rb") as fh:
        fh.seek(-1, os.SEEK_END)
        return fh.read(1)


def normalized(answers: list[dict]) -> list[dict]:
    """``answers`` as they read back from the cache (tuples become lists), so a resumed run
    and a fresh one compare like with like."""
    return json.loads(json.dumps(answers))


class AnswerCache:
    """The answers of one model (``role``: "bundle" or "reference") over the workload."""

    def __init__(self, out: Path, role: str, model: Path):
        self.path = Path(out) / FOLDER / f"{role}.jsonl"
        self._model = manifest_sha256(model) or f"folder:{Path(model).resolve()}"
        self._done: dict[str, list[dict]] = {}
        self.reused = 0
        if self.path.is_file():
            self._load()

    def _load(self) -> None:
        with open(self.path, encoding="utf-8") as fh:
            for n, line in enumerate(fh):
                try:
                    doc = json.loads(line)
                except ValueError:
                    continue             # a line torn by a kill
                if n and isinstance(doc, dict) and isinstance(doc.get("answers"), list):
                    self._done[str(doc.get("key"))] = doc["answers"]

    def key(self, board, questions: list[str], max_new_tokens: int = 64) -> str:
        files = []
        for p in (board.test_path, board.template_path):
            p = Path(p)
            files.append([p.name, p.stat().st_size])
        parts = [self._model, str(board.group), str(board.id), files, questions]
        if max_new_tokens != 64:   # the default keeps the keys of caches written before it
            parts.append(max_new_tokens)
        blob = json.dumps(parts)
        return hashlib.sha256(blob.encode()).hexdigest()

    def get(self, key: str) -> list[dict] | None:
        got = self._done.get(key)
        if got is not None:
            self.reused += 1
        return got

    def put(self, key: str, answers: list[dict]) -> None:
        """Append (flushed and fsynced: a kill loses at most this board). Answers holding a
        non-finite number are not kept: JSON cannot carry them exactly."""
        if not _finite(answers):
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fresh = not self.path.is_file() or self.path.stat().st_size == 0
        torn = not fresh and _last_byte(self.path) != b"\n"
        with open(self.path, "a", encoding="utf-8") as fh:
            if fresh:
                fh.write(json.dumps(HEADER) + "\n")
            elif torn:
                fh.write("\n")          # end the torn line: this one must parse
            fh.write(json.dumps({"key": key, "answers": answers}, allow_nan=False) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        self._done[key] = answers
