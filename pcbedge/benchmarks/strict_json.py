"""Strict JSON for every file the bench writes: NaN and infinity never reach a file.

``json.dumps`` writes ``NaN`` / ``Infinity`` by default, which is not JSON: strict parsers (jq,
JavaScript's JSON.parse, most CI dashboards) refuse the whole file. The bench maps each
non-finite number to ``null`` and lists where it was (``nonfinite_values`` in report.json),
then writes with ``allow_nan=False`` so a value that slipped past is a bug that fails loudly.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

NOTE = ("these figures were NaN or infinite (undefined, or a bug in the measurement) and are "
        "written as null")


def to_plain(o):
    """numpy scalars and arrays as Python numbers and lists, paths as text (else TypeError)."""
    import numpy as np
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"{type(o).__name__} is not JSON serialisable")


def replace_nonfinite(obj, where: str = "$", found: list[str] | None = None):
    """(``obj`` with every NaN / +-inf float as None, the JSON paths of those values).

    numpy scalars and arrays are converted first, so a ``np.float32('nan')`` is caught too."""
    found = [] if found is None else found
    if isinstance(obj, float):
        if math.isfinite(obj):
            return obj, found
        found.append(where)
        return None, found
    if obj is None or isinstance(obj, (str, int)):   # bool is an int
        return obj, found
    if isinstance(obj, dict):
        return {k: replace_nonfinite(v, f"{where}.{k}", found)[0]
                for k, v in obj.items()}, found
    if isinstance(obj, (list, tuple)):
        return [replace_nonfinite(v, f"{where}[{i}]", found)[0]
                for i, v in enumerate(obj)], found
    try:
        plain = to_plain(obj)
    except TypeError:
        return obj, found   # json.dumps names the type
    return replace_nonfinite(plain, where, found)


def dumps(obj, *, indent: int | None = None) -> str:
    """Strict JSON text of ``obj`` (already cleaned by :func:`replace_nonfinite`)."""
    return json.dumps(obj, indent=indent, allow_nan=False, default=to_plain)


def clean_report(report: dict, extra: list[str] | None = None) -> list[str]:
    """Clean ``report`` in place (the returned report and report.json agree); record the paths
    of the replaced values (and ``extra`` ones, from other files) under ``nonfinite_values``."""
    clean, found = replace_nonfinite({k: v for k, v in report.items()
                                      if k != "nonfinite_values"})
    found = found + list(extra or [])
    report.clear()
    report.update(clean)
    if found:
        report["nonfinite_values"] = {"note": NOTE, "paths": found}
    return found
