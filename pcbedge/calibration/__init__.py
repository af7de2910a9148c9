"""Calibration data for the INT8 graphs: a hashed board set and iterators over its inputs.

Callers pass these iterators into :func:`pcbedge.build.quantize.quantize_graph`; nothing here
loads data behind the caller's back.
"""
from __future__ import annotations

from pcbedge.calibration.sets import (MIN_BOARDS, CalibrationEntry, CalibrationSet,
                                      iter_vision_inputs, select_calibration_set,
                                      select_heldout_set)

__all__ = ["MIN_BOARDS", "CalibrationEntry", "CalibrationSet", "iter_vision_inputs",
           "select_calibration_set", "select_heldout_set"]
