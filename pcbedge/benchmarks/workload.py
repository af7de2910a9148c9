"""The bench workload (boards and their fixed question set) and the two passes that run it.

Boards come from a DeepPCB-layout folder and a list file. Every board gets the same kind of
question set, drawn with the HELD-OUT phrasings of :mod:`pcbedge.data.qa` from a generator seeded
by the board id, so a board's questions do not depend on which other boards are in the list
(a subset bench asks exactly what the full bench asks of those boards).

* Accuracy pass: every board x question once, through the runner's ``prepare`` / ``encode``
  / ``answer`` (one vision pass per board, the family's own preprocessing).
* Latency pass (MLPerf SingleStream): one full ``ask`` at a time (file decode and preprocessing
  included), cycling through the workload until both a query count and a duration are reached.
"""
from __future__ import annotations

import functools
import time
import zlib
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Callable

from pcbedge.data.deeppcb import Board, find_data_root, read_list
from pcbedge.data.degrade import Degrade
from pcbedge.data.preprocess import read_gray
from pcbedge.data.qa import QA, QuestionGenerator
from pcbedge.errors import DatasetError, InputImageError, PcbEdgeError

QUESTION_SPLIT = "heldout"
QUESTION_SEED = 20240601  # fixed: changing it changes every bench's questions
DEFAULT_LISTS = ("bench.txt", "test.txt")  # looked for, in order, under a data folder
STAGES = ("preprocess", "vision", "prefill", "decode")
DEFAULT_NEW_TOKENS = 64   # the runners' own default


@dataclass(frozen=True)
class Query:
    """One question about one board; ``board_index`` indexes :attr:`Workload.boards`."""

    board_index: int
    qa: QA


@dataclass(frozen=True)
class Workload:
    boards: tuple[Board, ...]
    queries: tuple[Query, ...]       # board by board, the questions of each in order
    data_root: Path
    list_file: Path
    question_split: str = QUESTION_SPLIT
    max_new_tokens: int = DEFAULT_NEW_TOKENS   # the cap on each answer's generated tokens

    @cached_property
    def _by_board(self) -> dict[int, list[Query]]:
        out: dict[int, list[Query]] = {i: [] for i in range(len(self.boards))}
        for q in self.queries:
            out[q.board_index].append(q)
        return out

    def board_queries(self, i: int) -> list[Query]:
        """The questions of board ``i``, in order (answers are aligned with this list)."""
        return self._by_board[i]


def board_ground_truth(board: Board) -> list[dict]:
    """The board's DeepPCB defects as metric dicts (boxes in original pixels)."""
    return [{"type": d.type, "bbox": list(d.bbox)} for d in board.defects]


DETECTION_QUESTION = "Describe all defects."


def board_size(board: Board) -> tuple[int, int]:
    """The board image's (width, height) in pixels, read from the file header once per path."""
    return _image_size(str(board.test_path))


@functools.lru_cache(maxsize=4096)
def _image_size(path: str) -> tuple[int, int]:
    from PIL import Image
    with Image.open(path) as im:
        return im.size


def board_questions(board: Board, seed: int = QUESTION_SEED) -> list[QA]:
    """describe-all, where / count / exists for one present and one absent type, then one
    well-posed question of each new kind (total, verdict, region, nearest, two types,
    largest / smallest, typos; :mod:`pcbedge.data.qa_kinds`).

    The detection figures (DeepPCB AP, count match, hallucinations) come from the canonical
    ``DETECTION_QUESTION``, so they measure what the model sees, not how it reads a paraphrase;
    the typed questions use the held-out phrasings, so their accuracy measures that."""
    board_seed = zlib.crc32(f"{seed}:{board.group}/{board.id}".encode())
    gen = QuestionGenerator(seed=board_seed, split=QUESTION_SPLIT)
    qs = gen.for_board_eval_all({d.type for d in board.defects}, board_ground_truth(board),
                                board_size(board))
    return [QA(DETECTION_QUESTION, "describe", None) if q.kind == "describe" else q for q in qs]


def _resolve_list(root: Path, list_file, data_given: bool) -> Path:
    if list_file is not None:
        lf = Path(list_file)
        return root / lf if not lf.is_absolute() and (root / lf).is_file() else lf
    for name in DEFAULT_LISTS:
        if (root / name).is_file():
            return root / name
    hint = "" if data_given else " (the embedded sample should hold bench.txt: reinstall pcbedge)"
    raise DatasetError(f"data folder {root} holds none of {', '.join(DEFAULT_LISTS)}{hint}",
                       fix="pass list_file= (--list FILE) naming the boards to bench")


def load_workload(data=None, list_file=None, max_boards: int | None = None,
                  max_new_tokens: int | None = None) -> Workload:
    """Boards of ``list_file`` under ``data`` (default: the embedded sample's bench.txt);
    ``max_new_tokens`` caps every answer (default 64, the runners' own).

    The whole list is validated here, before any runner is opened: every line parses, its
    images exist and agree in size, its boxes lie inside the image, and every benched board's
    images decode. A bad last line fails before the first board is answered."""
    if max_boards is not None and (isinstance(max_boards, bool) or not isinstance(max_boards, int)
                                   or max_boards < 1):
        raise PcbEdgeError(f"max_boards {max_boards!r} is not a positive integer",
                           fix="pass e.g. max_boards=8, or None for every board of the list")
    if max_new_tokens is None:
        max_new_tokens = DEFAULT_NEW_TOKENS
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) \
            or max_new_tokens < 1:
        raise PcbEdgeError(f"max_new_tokens {max_new_tokens!r} is not a positive integer",
                           fix="pass e.g. max_new_tokens=16 (--max-new-tokens 16)")
    root = find_data_root(data)
    if not root.is_dir():
        raise DatasetError(f"data folder {root} does not exist",
                           fix="pass --data DIR pointing at a DeepPCB-layout folder")
    lf = _resolve_list(root, list_file, data is not None)
    boards = read_list(root, lf)[:max_boards]   # every line checked, even past max_boards
    check_board_images(boards, lf)
    queries = tuple(Query(i, qa) for i, b in enumerate(boards) for qa in board_questions(b))
    return Workload(tuple(boards), queries, root, lf, max_new_tokens=max_new_tokens)


def check_board_images(boards, list_file: Path) -> None:
    """Decode every board and template once (a truncated JPEG on line 200 must not surface
    after the latency pass); the error names the list line."""
    seen: set[Path] = set()
    for board in boards:
        for path in (board.test_path, board.template_path):
            if path in seen:
                continue
            try:
                read_gray(path)
            except InputImageError as e:
                where = f"{list_file}:{board.list_line}" if board.list_line else str(list_file)
                msg = str(e).removesuffix(f"\n  fix: {e.fix}") if e.fix else str(e)
                raise InputImageError(f"{where}: {msg}", fix=e.fix) from None
            seen.add(path)


# ----------------------------------------------------------------------------- runner access

def board_input(runner, board: Board, degrade: Degrade | None = None):
    """The runner's prepared input of a board; ``degrade`` maps the uint8 (test, template)
    first (the robustness checks)."""
    if degrade is None:
        return runner.prepare(board.test_path, board.template_path)
    test, temp = read_gray(board.test_path), read_gray(board.template_path)
    if test.shape != temp.shape:
        raise InputImageError(f"template {board.template_path} and board {board.test_path} "
                              "differ in size", fix="pass aligned pairs of one size")
    test, temp = degrade(test, temp)
    return runner.prepare(test, temp)


def answer_boards(runner, workload: Workload, *, degrade: Degrade | None = None,
                  describe_only: bool = False, progress: bool = True,
                  desc: str = "accuracy", cache=None) -> list[list[dict]]:
    """answers[i][k]: the answer to question k of board i (one prepare and one vision pass per
    board, through the runner protocol). ``cache``: an
    :class:`~pcbedge.benchmarks.answer_cache.AnswerCache` (``bench --resume``; clean boards,
    all questions only): boards already in it are not answered again, new ones are appended.
    ``runner`` may then be a zero-argument callable that opens the runner when first needed."""
    from pcbedge.benchmarks.answer_cache import normalized
    from pcbedge.benchmarks.progress import progress as tqdm  # a bar on a tty, lines in a log

    use_cache = cache is not None and degrade is None and not describe_only
    out: list[list[dict]] = []
    for i, board in enumerate(tqdm(workload.boards, desc=desc, unit="board",
                                   enabled=progress)):
        qs = workload.board_queries(i)
        if describe_only:
            qs = [q for q in qs if q.qa.kind == "describe"][:1]
        key = (cache.key(board, [q.qa.question for q in qs], workload.max_new_tokens)
               if use_cache else None)
        got = cache.get(key) if use_cache else None
        if got is not None and len(got) == len(qs):
            out.append(got)
            continue
        if callable(runner) and not hasattr(runner, "encode"):
            runner = runner()          # opened only when a board is not in the cache
        enc = runner.encode(board_input(runner, board, degrade))
        answers = [runner.answer(enc, q.qa.question, max_new_tokens=workload.max_new_tokens)
                   for q in qs]
        if use_cache:
            answers = normalized(answers)
            cache.put(key, answers)
        out.append(answers)
    return out


# ----------------------------------------------------------------------------- latency pass

def _one_query(runner, workload: Workload, q: Query) -> tuple[dict, float]:
    board = workload.boards[q.board_index]
    t0 = time.perf_counter()
    ans = runner.ask(board.test_path, board.template_path, q.qa.question,
                     max_new_tokens=workload.max_new_tokens)
    return ans, (time.perf_counter() - t0) * 1000.0


def _record(q: Query, ans: dict, wall_ms: float) -> dict:
    lat = ans.get("latency_ms") or {}
    rec = {"kind": q.qa.kind, "total": wall_ms}
    for s in STAGES:
        v = lat.get(s)
        rec[s] = float(v) if isinstance(v, (int, float)) else None
    rec["runner_total"] = float(lat["total"]) if isinstance(lat.get("total"), (int, float)) \
        else None
    return rec


def latency_pass(runner, workload: Workload, *, queries: int, min_seconds: float, warmup: int,
                 start: int = 0, progress: bool = True, on_query: Callable | None = None) -> dict:
    """SingleStream: ``warmup`` unmeasured queries, then one at a time until at least ``queries``
    measured AND ``min_seconds`` elapsed. ``on_query()`` runs after each measured query (RSS)."""
    from pcbedge.benchmarks.progress import progress as tqdm  # a bar on a tty, lines in a log

    n_work = len(workload.queries)
    k = start
    for _ in range(warmup):
        _one_query(runner, workload, workload.queries[k % n_work])
        k += 1
    records: list[dict] = []
    bar = tqdm(total=queries, desc="latency", unit="q", enabled=progress)
    t_start = time.perf_counter()
    while len(records) < queries or time.perf_counter() - t_start < min_seconds:
        q = workload.queries[k % n_work]
        ans, wall = _one_query(runner, workload, q)
        records.append(_record(q, ans, wall))
        k += 1
        if on_query is not None:
            on_query()
        if len(records) <= queries:
            bar.update(1)
    elapsed = time.perf_counter() - t_start
    bar.close()
    return {"records": records, "elapsed_s": elapsed, "warmup": warmup}


def check_pass_args(queries, min_seconds, warmup) -> None:
    """Fail loudly on a latency pass that would be empty or never end."""
    if isinstance(queries, bool) or not isinstance(queries, int) or queries < 1:
        raise PcbEdgeError(f"queries {queries!r} is not a positive integer",
                           fix="pass e.g. queries=200 (MLPerf SingleStream uses >= 1024)")
    if isinstance(min_seconds, bool) or not isinstance(min_seconds, (int, float)) \
            or not 0 <= min_seconds < float("inf"):
        raise PcbEdgeError(f"min_seconds {min_seconds!r} is not a finite number >= 0",
                           fix="pass e.g. min_seconds=10")
    if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
        raise PcbEdgeError(f"warmup {warmup!r} is not an integer >= 0", fix="pass e.g. warmup=5")


def open_runner(path, **kwargs):
    """The runner for a bundle or model folder (the one place the bench builds runners)."""
    from pcbedge.runtime import load_runner
    return load_runner(path, **kwargs)
