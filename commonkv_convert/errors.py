"""One small exception hierarchy; the CLI maps each class to a one-line message and an exit code."""

from __future__ import annotations


class CommonKVError(Exception):
    """Base class. The message is a complete sentence that ends with how to fix the problem."""

    exit_code = 1


class UserInputError(CommonKVError):
    """Bad flags or arguments (ratio out of range, group size too large, output exists)."""

    exit_code = 2


class ModelSourceError(CommonKVError):
    """The model path or Hub id cannot be used (missing, not a model, pickle-only, offline)."""

    exit_code = 3


class UnsupportedModelError(CommonKVError):
    """The architecture is not one the converter knows."""

    exit_code = 4


class CalibrationError(CommonKVError):
    """The calibration data is missing, empty or too short."""

    exit_code = 5


class PlanError(CommonKVError):
    """No plan reaches the requested ratio with the chosen options."""

    exit_code = 6


class ValidationError(CommonKVError):
    """The converted checkpoint failed its post-write checks."""

    exit_code = 7


class HubError(CommonKVError):
    """The Hub refused the push or could not be reached (no or rejected token, no write access, offline)."""

    exit_code = 8
