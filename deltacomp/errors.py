"""Errors a user can act on. The CLI prints their message as one line and exits non-zero."""


class DeltacompError(Exception):
    """A problem with the user's input or environment, with a message that says what to change."""


class CheckpointError(DeltacompError):
    """A model folder or weight file that cannot be read as a checkpoint."""


class MismatchError(DeltacompError):
    """Base and fine-tuned checkpoints (or a package and a base) that do not belong together."""


class BudgetError(DeltacompError):
    """A bit budget that is invalid or too small for the matrix it must cover."""


class PackageError(DeltacompError):
    """A delta package that is missing, incomplete, corrupt or of an unknown format."""


class OutputError(DeltacompError):
    """An output path that exists (without --overwrite) or cannot be written."""
