"""Typed errors of pcbedge.

Every error a user can cause is one of these types; the CLI maps each type to its own exit code
and prints the message (which names the bad value, the valid choices and the fix) without a
traceback. Library users catch :class:`PcbEdgeError`.
"""
from __future__ import annotations


class PcbEdgeError(Exception):
    """Base class: a problem the user can fix. ``exit_code`` is the CLI's exit status."""

    exit_code = 10

    def __init__(self, message: str, *, fix: str | None = None):
        self.fix = fix
        super().__init__(message if not fix else f"{message}\n  fix: {fix}")


class InputImageError(PcbEdgeError):
    """An image is missing, unreadable, truncated, of the wrong size or not aligned."""

    exit_code = 11


class DatasetError(PcbEdgeError):
    """A dataset folder, list file or annotation line is missing or does not parse."""

    exit_code = 12


class QuestionError(PcbEdgeError):
    """A question is empty, too long, or not text."""

    exit_code = 13


class TargetError(PcbEdgeError):
    """An unknown target name or a target profile with a wrong field."""

    exit_code = 14


class CalibrationError(PcbEdgeError):
    """Too few or unreadable calibration boards."""

    exit_code = 15


class ModelError(PcbEdgeError):
    """A model checkpoint is missing, of an unknown family, or in an unsafe format (pickle)."""

    exit_code = 16


class BundleError(PcbEdgeError):
    """A bundle is incomplete, tampered with (hash mismatch), from a newer schema, or unsafe."""

    exit_code = 17


class HardwareMismatchError(PcbEdgeError):
    """A bundle or engine built for other hardware or another runtime version."""

    exit_code = 18


class ExportError(PcbEdgeError):
    """An export failed or its graphs disagree with PyTorch past the tolerance."""

    exit_code = 19


class OutputError(PcbEdgeError):
    """The output folder cannot be written (read-only, full disk, exists and not empty)."""

    exit_code = 20


class DependencyError(PcbEdgeError):
    """An optional dependency (the [export] or [tensorrt] extra) is not installed."""

    exit_code = 21


class GateFailed(PcbEdgeError):
    """A benchmark gate was missed. Not a user mistake, but a distinct, documented exit code."""

    exit_code = 3


class MachineBusy(PcbEdgeError):
    """The bench machine was busy and the profile says to refuse timing on a busy machine
    (``[bench] busy_machine = "refuse"``). Not a user mistake: retry on a quiet machine."""

    exit_code = 4


ALL_ERRORS: tuple[type[PcbEdgeError], ...] = (
    PcbEdgeError, InputImageError, DatasetError, QuestionError, TargetError, CalibrationError,
    ModelError, BundleError, HardwareMismatchError, ExportError, OutputError, DependencyError,
    GateFailed, MachineBusy,
)
