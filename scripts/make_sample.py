"""Build the embedded sample ``pcbedge/data/sample/`` from the DeepPCB trainval split.

    python scripts/make_sample.py [--src ../shared/data/deeppcb] [--dst pcbedge/data/sample]

The sample keeps the DeepPCB layout and holds 64 boards: ``calib.txt`` (16 boards of the project's
TRAIN part and of the design split's training designs only, since the reference model never saw
the held-out designs and its INT8 ranges must not come from them; stratified by dominant defect
type so all six types appear), ``bench.txt`` (48 boards of the VALIDATION part, spread over all
groups) and ``trainval.txt`` (both). The choice is a pure function of the source list, so
re-running it gives the same files. The sample is built in a
temporary folder and renamed into place, so an interrupted run never leaves half a sample.
"""
from __future__ import annotations

import argparse
import shutil
import sys
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pcbedge.data.deeppcb import (DEFECT_TYPES, Board, read_list, split_designs,  # noqa: E402
                                  split_trainval)

N_CALIB = 16
N_BENCH = 48
MAX_BYTES = 6_000_000

README = """\
# Embedded DeepPCB sample

A small, fixed subset of the public DeepPCB dataset (https://github.com/tangsanli5201/DeepPCB,
MIT licence, see LICENSE in this folder), shipped inside the package so that the examples, the
tests and a quick calibration/benchmark run need no download. Every board comes from the
published `trainval` split; none comes from DeepPCB's test split.

Made by `scripts/make_sample.py` from `../shared/data/deeppcb`; do not edit by hand.

Layout as in DeepPCB: `groupG/N/ID_test.jpg`, `groupG/N/ID_temp.jpg`, `groupG/N_not/ID.txt`
(`x1 y1 x2 y2 type` a line). List files (`groupG/N/ID.jpg groupG/N_not/ID.txt` a line):

- `calib.txt`: {n_calib} boards of the project's TRAIN part (`split_trainval` on the full
  trainval) and of the design split's five training designs (`split_designs`: no board of
  `group77000` or `group92000`, the held-out designs), stratified by dominant defect type, so
  all six types appear.
- `bench.txt`: {n_bench} boards of the VALIDATION part, spread over all {n_groups} groups.
- `trainval.txt`: all {n_all} boards of the sample.

Do not call `split_trainval` on the sample itself: the split is defined on the full trainval
list, so use `calib.txt` (train side) and `bench.txt` (validation side) instead.
"""


def _list_line(b: Board, root: Path) -> str:
    rel = b.test_path.relative_to(root).parent
    ann = b.annotation_path.relative_to(root)
    return f"{rel.as_posix()}/{b.id}.jpg {ann.as_posix()}"


def _even_pick(items: list, n: int) -> list:
    """``n`` items evenly spaced over ``items`` (first and last included when n > 1)."""
    if n >= len(items):
        return list(items)
    if n == 1:
        return [items[len(items) // 2]]
    return [items[round(i * (len(items) - 1) / (n - 1))] for i in range(n)]


def _allocate(sizes: dict[str, int], n: int) -> dict[str, int]:
    """Largest-remainder allocation of ``n`` over strata proportional to ``sizes``, >= 1 each."""
    total = sum(sizes.values())
    exact = {k: n * s / total for k, s in sizes.items()}
    alloc = {k: max(1, min(sizes[k], int(v))) for k, v in exact.items()}
    by_remainder = sorted(sizes, key=lambda k: (-(exact[k] - int(exact[k])), k))
    i = 0
    while sum(alloc.values()) < n:
        k = by_remainder[i % len(by_remainder)]
        if alloc[k] < sizes[k]:
            alloc[k] += 1
        i += 1
    return alloc


def dominant_type(b: Board) -> str:
    counts = Counter(d.type for d in b.defects)
    return min(counts, key=lambda t: (-counts[t], DEFECT_TYPES.index(t)))


def pick_calib(train: list[Board], n: int = N_CALIB) -> list[Board]:
    """Stratified by dominant defect type (equal shares); within a type, evenly spaced over
    (group, id)."""
    strata: dict[str, list[Board]] = {t: [] for t in DEFECT_TYPES}
    for b in sorted(train, key=lambda b: (b.group, b.id)):
        strata[dominant_type(b)].append(b)
    missing = [t for t, bs in strata.items() if not bs]
    if missing:
        raise SystemExit(f"no train board is dominated by {missing}; cannot stratify")
    # equal shares (the remainder to the largest strata): a proportional share would give
    # "open" most of the slots, because ties of the dominant type break towards it
    base, extra = divmod(n, len(DEFECT_TYPES))
    largest = sorted(DEFECT_TYPES, key=lambda t: (-len(strata[t]), DEFECT_TYPES.index(t)))
    alloc = {t: min(len(strata[t]), base + (t in largest[:extra])) for t in DEFECT_TYPES}
    if sum(alloc.values()) != n:
        raise SystemExit(f"too few train boards per dominant type to pick {n}: {alloc}")
    return [b for t in DEFECT_TYPES for b in _even_pick(strata[t], alloc[t])]


def pick_bench(val: list[Board], n: int = N_BENCH) -> list[Board]:
    """Proportional to group size (>= 1 per group); within a group, evenly spaced over ids."""
    groups: dict[str, list[Board]] = {}
    for b in sorted(val, key=lambda b: (b.group, b.id)):
        groups.setdefault(b.group, []).append(b)
    alloc = _allocate({g: len(bs) for g, bs in groups.items()}, n)
    return [b for g in sorted(groups) for b in _even_pick(groups[g], alloc[g])]


def write_sample(src: Path, dst: Path) -> dict:
    boards = read_list(src, "trainval.txt")
    train, val = split_trainval(boards)
    design_train = set(split_designs(boards)[0])
    calib, bench = pick_calib([b for b in train if b in design_train]), pick_bench(val)
    order = {b.id: i for i, b in enumerate(boards)}
    every = sorted(set(calib) | set(bench), key=lambda b: order[b.id])

    tmp = dst.with_name(dst.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for b in every:
        for p in (b.test_path, b.template_path, b.annotation_path):
            out = tmp / p.relative_to(src)
            out.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(p, out)
    for name, part in (("calib.txt", calib), ("bench.txt", bench), ("trainval.txt", every)):
        (tmp / name).write_text("".join(_list_line(b, src) + "\n" for b in part))
    shutil.copyfile(src / "LICENSE", tmp / "LICENSE")
    groups = {b.group for b in boards}
    (tmp / "README.md").write_text(README.format(n_calib=len(calib), n_bench=len(bench),
                                                 n_groups=len(groups), n_all=len(every)))
    size = sum(p.stat().st_size for p in tmp.rglob("*") if p.is_file())
    if size > MAX_BYTES:
        shutil.rmtree(tmp)
        raise SystemExit(f"sample would be {size:,} bytes, over {MAX_BYTES:,}")
    if dst.exists():
        shutil.rmtree(dst)
    tmp.rename(dst)
    return {"boards": len(every), "calib": len(calib), "bench": len(bench), "bytes": size,
            "calib_types": sorted({d.type for b in calib for d in b.defects}),
            "bench_groups": sorted({b.group for b in bench})}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--src", type=Path, default=REPO.parent / "shared" / "data" / "deeppcb")
    ap.add_argument("--dst", type=Path, default=REPO / "pcbedge" / "data" / "sample")
    args = ap.parse_args(argv)
    print(write_sample(args.src, args.dst))
    return 0


if __name__ == "__main__":
    sys.exit(main())
