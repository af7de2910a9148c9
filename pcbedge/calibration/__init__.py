"""Calibration boards for the INT8 graphs: a hashed board set drawn from a DeepPCB-layout folder.

Each family turns the boards into its graphs' feeds (``Family.calibration_feeds``), and the
build passes those into :func:`pcbedge.recipes.quantize.quantize_graph`; nothing loads data
behind the caller's back.
"""
from __future__ import annotations

from pcbedge.calibration.sets import (MIN_BOARDS, CalibrationEntry, CalibrationSet,
                                      select_calibration_set, select_heldout_set)

__all__ = ["MIN_BOARDS", "CalibrationEntry", "CalibrationSet", "select_calibration_set",
           "select_heldout_set"]
