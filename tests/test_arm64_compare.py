"""The answer comparison of scripts/arm64_check.py (pure functions: runs without the arm64 root)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))
import arm64_check  # noqa: E402

A = "Found 2 defects: short at (394, 177)-(420, 234), confidence 0.99; open at (10, 20)-(30, 40), confidence 1.00."


def test_texts_agree_up_to_printed_rounding_only():
    agree = arm64_check.texts_agree
    assert agree(A, A, 1.0, 0.02)
    # a confidence on either side of .5 in the second place, a box edge on either side of .5 px
    assert agree(A, A.replace("0.99", "0.98").replace("420", "421"), 1.0, 0.02)
    assert not agree(A, A.replace("short", "spur"), 1.0, 0.02)              # another type
    assert not agree(A, A.replace("0.99", "0.90"), 1.0, 0.02)               # beyond conf_tol
    assert not agree(A, A.replace("420", "423"), 1.0, 0.02)                 # beyond box_tol
    assert not agree(A, A.replace("0.99;", "0.99, 0.5;"), 1.0, 0.02)        # another number
    assert not agree(A, A.replace("0.99", "0.98"), 1.0, 0.0)                # tolerance 0: exact


def _cache(path: Path, answers: dict) -> Path:
    lines = [json.dumps({"header": True})] + [json.dumps({"key": k, "answers": v})
                                               for k, v in answers.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_compare_all_answers_counts_exact_and_beyond_rounding(tmp_path):
    d = {"type": "short", "bbox": [394.0, 177.0, 420.4, 234.0], "confidence": 0.985}
    e = dict(d, bbox=[394.0, 177.0, 420.6, 234.0], confidence=0.9802)
    x = _cache(tmp_path / "x.jsonl", {"b1": [{"answer": A, "defects": [d]}]})
    y = _cache(tmp_path / "y.jsonl", {"b1": [{"answer": A.replace("0.99", "0.98").replace(
        "420", "421"), "defects": [e]}]})
    r = arm64_check.compare_all_answers(x, y, 1.0, 0.02)
    assert r["answer_text_differs"] == 1 and r["answer_text_differs_beyond_rounding"] == 0
    assert r["agree"] and abs(r["max_box_diff_px"] - 0.2) < 1e-9
    z = _cache(tmp_path / "z.jsonl", {"b1": [{"answer": A.replace("short", "spur"),
                                              "defects": [dict(d, type="spur")]}]})
    r = arm64_check.compare_all_answers(x, z, 1.0, 0.02)
    assert not r["agree"] and r["defect_lists_differ"] == 1
    assert r["answer_text_differs_beyond_rounding"] == 1
