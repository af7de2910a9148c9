"""The DeepPCB reader: the shared trainval, the embedded sample, and bad input."""
from __future__ import annotations

import logging
import shutil
from collections import Counter
from pathlib import Path

import pytest

from pcbedge.data.deeppcb import (DEEPPCB_TYPE_IDS, DEFECT_TYPES, VAL_FRACTION, Defect,
                                  find_data_root, parse_annotation, read_list, split_trainval)
from pcbedge.errors import DatasetError

# ---------------------------------------------------------------- shared trainval (1,000 boards)


@pytest.fixture(scope="module")
def shared_boards(shared_data):
    return read_list(shared_data)


def test_shared_trainval_counts(shared_boards):
    assert len(shared_boards) == 1000
    assert len({b.id for b in shared_boards}) == 1000
    assert len({b.group for b in shared_boards}) == 7
    assert all(len(b.defects) >= 1 for b in shared_boards)
    types = Counter(d.type for b in shared_boards for d in b.defects)
    assert set(types) == set(DEFECT_TYPES)
    assert sum(types.values()) == 6873


def test_shared_boxes_inside_640(shared_boards):
    for b in shared_boards:
        for d in b.defects:
            x1, y1, x2, y2 = d.bbox
            assert 0 <= x1 < x2 <= 640 and 0 <= y1 < y2 <= 640, (b.id, d)


def test_split_is_fixed_disjoint_and_per_group(shared_boards):
    train, val = split_trainval(shared_boards)
    train2, val2 = split_trainval(list(reversed(shared_boards)))
    assert [b.id for b in train] == [b.id for b in train2]
    assert [b.id for b in val] == [b.id for b in val2]
    tr, va = {b.id for b in train}, {b.id for b in val}
    assert not tr & va and len(tr | va) == len(shared_boards)
    assert (len(train), len(val)) == (800, 200)
    assert abs(len(val) / len(shared_boards) - VAL_FRACTION) < 0.01
    groups = {b.group for b in shared_boards}
    assert {b.group for b in train} == groups == {b.group for b in val}
    for g in groups:  # validation is the contiguous tail of each group's sorted ids
        assert max(b.id for b in train if b.group == g) < min(b.id for b in val if b.group == g)


def test_design_split_holds_out_whole_groups(shared_boards, shared_data):
    """split_designs: the held-out groups' boards are never train or seen-design validation;
    the written lists in pcbedge/data/splits/ are exactly the split."""
    from pcbedge.data.deeppcb import HELD_OUT_GROUPS, split_designs
    train, seen, unseen = split_designs(shared_boards)
    assert (len(train), len(seen), len(unseen)) == (631, 158, 211)
    assert {b.group for b in unseen} == set(HELD_OUT_GROUPS)
    assert not {b.group for b in train + seen} & set(HELD_OUT_GROUPS)
    assert {b.group for b in train} == {b.group for b in seen}
    ids = [{b.id for b in part} for part in (train, seen, unseen)]
    assert sum(map(len, ids)) == len(set().union(*ids)) == len(shared_boards)
    splits = Path(__file__).resolve().parents[1] / "pcbedge/data/splits"
    for name, part in zip(("train", "seen_val", "unseen_val"), (train, seen, unseen)):
        listed = read_list(shared_data, splits / f"deeppcb_designs_{name}.txt")
        assert [b.id for b in listed] == [b.id for b in part]


def test_split_keeps_a_singleton_group_in_train():
    from pcbedge.data.deeppcb import Board
    b = Board(id="1", group="g", test_path=Path("t"), template_path=Path("m"))
    assert split_trainval([b]) == ([b], [])


# ---------------------------------------------------------------- embedded sample


def test_sample_lists_read(sample_data):
    assert find_data_root(None) == sample_data.resolve()
    calib = read_list(sample_data, "calib.txt")
    bench = read_list(sample_data, "bench.txt")
    every = read_list(sample_data, "trainval.txt")
    assert (len(calib), len(bench), len(every)) == (16, 48, 64)
    assert {b.id for b in calib} | {b.id for b in bench} == {b.id for b in every}
    assert not {b.id for b in calib} & {b.id for b in bench}
    assert {d.type for b in calib for d in b.defects} == set(DEFECT_TYPES)
    assert len({b.group for b in bench}) == 7
    # calibration boards come from the design split's training designs only: the reference
    # model's INT8 ranges never see a held-out design
    from pcbedge.data.deeppcb import HELD_OUT_GROUPS
    assert {b.group for b in calib}.isdisjoint(HELD_OUT_GROUPS)
    assert (sample_data / "LICENSE").is_file() and (sample_data / "README.md").is_file()


def test_sample_respects_the_project_split(sample_data, shared_data):
    train, val = split_trainval(read_list(shared_data))
    assert {b.id for b in read_list(sample_data, "calib.txt")} <= {b.id for b in train}
    assert {b.id for b in read_list(sample_data, "bench.txt")} <= {b.id for b in val}
    assert (sample_data / "LICENSE").read_bytes() == (shared_data / "LICENSE").read_bytes()


def test_sample_is_small(sample_data):
    size = sum(p.stat().st_size for p in sample_data.rglob("*") if p.is_file())
    assert size < 6_000_000


# ---------------------------------------------------------------- bad input


def _mini_dataset(root: Path, sample_data: Path, n: int = 3) -> list[str]:
    """Copy the first ``n`` sample boards into ``root``; return their list lines."""
    lines = (sample_data / "trainval.txt").read_text().splitlines()[:n]
    for line in lines:
        img, ann = line.split()
        stem = img[: -len(".jpg")]
        for rel in (f"{stem}_test.jpg", f"{stem}_temp.jpg", ann):
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(sample_data / rel, root / rel)
    (root / "trainval.txt").write_text("\n".join(lines) + "\n")
    return lines


def test_missing_folder(tmp_path):
    with pytest.raises(DatasetError, match="does not exist") as e:
        read_list(tmp_path / "nope")
    assert e.value.exit_code == 12 and "nope" in str(e.value)


def test_missing_list_file(tmp_path):
    with pytest.raises(DatasetError, match="not found") as e:
        read_list(tmp_path, "absent.txt")
    assert "absent.txt" in str(e.value)


@pytest.mark.parametrize("bad_line, reason", [
    ("10 20 30", "expected"),
    ("10 20 30 forty 1", "not numbers"),
    ("10 20 30 40 7", "unknown defect type id 7"),
    ("10 20 5 40 1", "empty box"),
])
def test_bad_annotation_line_names_file_and_line(tmp_path, bad_line, reason):
    ann = tmp_path / "00000001.txt"
    ann.write_text(f"1 2 3 4 1\n\n{bad_line}\n")
    with pytest.raises(DatasetError, match=reason) as e:
        parse_annotation(ann)
    assert f"{ann}:3:" in str(e.value)


def test_annotation_parses_every_type_id(tmp_path):
    ann = tmp_path / "a.txt"
    ann.write_text("".join(f"{i} {i} {i + 10} {i + 10} {i}\n" for i in DEEPPCB_TYPE_IDS))
    assert [d.type for d in parse_annotation(ann)] == list(DEFECT_TYPES)


def test_unknown_type_name():
    with pytest.raises(DatasetError, match="unknown defect type 'scratch'"):
        Defect("scratch", (0, 0, 1, 1))


def test_missing_image_names_list_line(tmp_path, sample_data):
    lines = _mini_dataset(tmp_path, sample_data)
    stem = lines[1].split()[0][: -len(".jpg")]
    (tmp_path / f"{stem}_temp.jpg").unlink()
    with pytest.raises(DatasetError, match="not found") as e:
        read_list(tmp_path)
    assert "trainval.txt:2:" in str(e.value) and f"{Path(stem).name}_temp.jpg" in str(e.value)


def test_missing_annotation_file(tmp_path, sample_data):
    lines = _mini_dataset(tmp_path, sample_data)
    (tmp_path / lines[0].split()[1]).unlink()
    with pytest.raises(DatasetError, match="cannot read annotation file"):
        read_list(tmp_path)


def test_skip_bad_reads_the_rest_and_logs(tmp_path, sample_data, caplog):
    lines = _mini_dataset(tmp_path, sample_data)
    bad_ann = tmp_path / lines[0].split()[1]
    bad_ann.write_text("10 20 30 40 1\n10 20 30 40 9\n")
    missing = tmp_path / (lines[2].split()[0][: -len(".jpg")] + "_test.jpg")
    missing.unlink()
    with pytest.raises(DatasetError):
        read_list(tmp_path)
    with caplog.at_level(logging.WARNING, logger="pcbedge.data.deeppcb"):
        boards = read_list(tmp_path, skip_bad=True)
    assert [b.id for b in boards] == [Path(lines[1].split()[0]).stem]
    text = caplog.text
    assert len(caplog.records) == 2
    assert f"{bad_ann}:2:" in text and "unknown defect type id 9" in text
    assert str(missing) in text


def test_skip_bad_with_nothing_left_still_raises(tmp_path, sample_data):
    lines = _mini_dataset(tmp_path, sample_data, n=1)
    (tmp_path / lines[0].split()[1]).write_text("garbage\n")
    with pytest.raises(DatasetError, match="names no readable board"):
        read_list(tmp_path, skip_bad=True)


def test_malformed_list_line(tmp_path, sample_data):
    _mini_dataset(tmp_path, sample_data, n=1)
    (tmp_path / "trainval.txt").write_text("only-one-field.jpg\n")
    with pytest.raises(DatasetError, match=r"trainval.txt:1: expected 'IMAGE ANNOTATION'"):
        read_list(tmp_path)


# ---------------------------------------------------------------- known bugs in deeppcb.py


def test_infinite_coordinate_is_a_dataset_error(tmp_path):
    ann = tmp_path / "a.txt"
    ann.write_text("1 2 inf 4 1\n")
    with pytest.raises(DatasetError, match=f"{ann}:1:"):
        parse_annotation(ann)


def test_relative_list_file_is_read_under_root(tmp_path, sample_data, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "calib.txt").write_text("not/a/board.jpg not/an/annotation.txt\n")
    assert len(read_list(sample_data, "calib.txt")) == 16
