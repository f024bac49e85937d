"""Errors moec raises for bad input, each mapped to a process exit code.

Every message says what is wrong, where (op, module path or file) and what to do.
"""

from __future__ import annotations


class MoecError(Exception):
    """Base class: a user-facing problem; the CLI prints the message and exits with `exit_code`."""

    exit_code = 2


class SourceError(MoecError):
    """The SOURCE argument can't be loaded (module, factory, checkpoint, model dir)."""

    exit_code = 3


class CaptureError(MoecError):
    """torch.export could not capture the model."""

    exit_code = 4


class UnsupportedOpError(MoecError):
    """An op in the captured graph has no lowering for the target."""

    exit_code = 5


class PassValidationError(MoecError):
    """A pass changed the model's numerics on probe inputs."""

    exit_code = 6


class PassContractError(MoecError):
    """A pass ran without what it requires, or did not establish what it ensures (names the pass)."""

    exit_code = 21


class DiskFullError(MoecError):
    """The disk (or a file-size limit) ran out while writing; nothing was left behind."""

    exit_code = 22


class FusionRequiredError(MoecError):
    """--require-fusion and a MoE layer stayed unfused."""

    exit_code = 7


class VerificationError(MoecError):
    """The artifact's outputs do not match eager PyTorch within tolerance."""

    exit_code = 8


class OutputExistsError(MoecError):
    """The output directory or model version exists and --force was not given."""

    exit_code = 9


class AccuracyBudgetError(MoecError):
    """--accuracy-budget: quantization error against full precision is over budget."""

    exit_code = 16


class NoFusedLayerError(MoecError):
    """--quant / --prune-experts on a model where no MoE layer was fused: nothing to work on."""

    exit_code = 17


class DeviceMemoryError(MoecError):
    """--device-memory: the model can't fit at the max profile."""

    exit_code = 19


# `moec verify` (and `moec golden`) exit codes
class NumericsMismatchError(MoecError):
    """The artifact's outputs differ from the golden outputs beyond the tolerance."""

    exit_code = 10


class GoldenError(MoecError):
    """Golden files are missing, unreadable, or don't match their manifest's hashes."""

    exit_code = 11


class ArtifactError(MoecError):
    """The artifact is missing or can't be loaded."""

    exit_code = 12


class SignatureMismatchError(MoecError):
    """Golden inputs don't fit the artifact (names, dtypes, ranks)."""

    exit_code = 13


class ServerError(MoecError):
    """The Triton server could not be installed, started or reached."""

    exit_code = 14


class ModelNotReadyError(MoecError):
    """The server runs, but the model is not ready; the message quotes the server's reason."""

    exit_code = 15
