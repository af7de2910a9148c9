"""The Qwen-VL answer parser: grounding tokens, JSON, unparsed replies, unknown types."""
from __future__ import annotations

import pytest

from pcbedge.data.deeppcb import DEFECT_TYPES
from pcbedge.families.qwen_vl.answer import BoxFrame, canonical_type, parse_reply

NORM = BoxFrame("norm1000", resized=(644, 644), original=(640, 640))
PIXELS = BoxFrame("resized_pixels", resized=(644, 644), original=(640, 640))


def test_grounding_tokens_on_the_1000_grid():
    text = ("<|object_ref_start|>short<|object_ref_end|><|box_start|>(100,200),(150,250)"
            "<|box_end|> and <|object_ref_start|>open<|object_ref_end|><|box_start|>(0, 0), "
            "(1000, 1000)<|box_end|>")
    a = parse_reply(text, NORM, DEFECT_TYPES)
    assert a["format"] == "grounding" and a["count"] == 2 and "parse_error" not in a
    assert a["defects"][0] == {"type": "short", "bbox": [64.0, 128.0, 96.0, 160.0],
                               "center": [80.0, 144.0], "confidence": None}
    assert a["defects"][1]["bbox"] == [0.0, 0.0, 640.0, 640.0]


def test_grounding_type_from_the_word_before_the_box():
    a = parse_reply("mouse bite: <|box_start|>(10,10),(20,20)<|box_end|>", NORM, DEFECT_TYPES)
    assert [d["type"] for d in a["defects"]] == ["mousebite"]


def test_json_answer_in_resized_pixels():
    text = ('```json\n{"defects": [{"type": "spur", "bbox_2d": [322, 0, 644, 161]}, '
            '{"type": "Pin hole", "bbox_2d": [0, 0, 10, 10]}]}\n```')
    a = parse_reply(text, PIXELS, DEFECT_TYPES)
    assert a["format"] == "json" and a["count"] == 2
    assert a["defects"][0]["bbox"] == [320.0, 0.0, 640.0, 160.0]
    assert a["defects"][1]["type"] == "pin_hole"


def test_boxes_are_clipped_and_ordered():
    a = parse_reply('[{"type": "open", "bbox_2d": [900, 1200, -5, 100]}]', NORM, DEFECT_TYPES)
    assert a["defects"][0]["bbox"] == [0.0, 64.0, 576.0, 640.0]


def test_unknown_types_are_dropped_with_a_note():
    a = parse_reply('{"defects": [{"type": "scratch", "bbox_2d": [1, 2, 3, 4]}, '
                    '{"type": "short", "bbox_2d": [1, 2]}]}', NORM, DEFECT_TYPES)
    assert a["count"] == 0 and a["defects"] == [] and "parse_error" not in a
    assert any("scratch" in n for n in a["notes"]) and any("bbox_2d" in n for n in a["notes"])


@pytest.mark.parametrize("text", ["", "the board looks fine to me", "{not json",
                                  "<|box_start|>(1,2)<|box_end|>", '{"defects": "many"}',
                                  "[1, 2, 3, 4]"])
def test_unparsed_reply_is_never_a_defect(text):
    a = parse_reply(text, NORM, DEFECT_TYPES)
    assert a["parse_error"] and a["count"] == 0 and a["defects"] == []
    assert a["intent"] == "unparsed"


def test_no_defects_statement_and_empty_json_are_answers():
    for text in ("There are no defects on this board.", '{"defects": []}'):
        a = parse_reply(text, NORM, DEFECT_TYPES)
        assert "parse_error" not in a and a["count"] == 0 and a["answer"] == "No defects found."


def test_cut_reply_is_marked_incomplete():
    a = parse_reply('{"defects": [{"type": "short", "bbox_2d": [1, 2, 3, 4]}]}', NORM,
                    DEFECT_TYPES, complete=False)
    assert a["complete"] is False and a["answer"].endswith("(answer cut at the token limit)")


def test_canonical_type():
    assert canonical_type("Spurious copper", DEFECT_TYPES) == "spurious_copper"
    assert canonical_type("shorts", DEFECT_TYPES) == "short"
    assert canonical_type(3, DEFECT_TYPES) is None
