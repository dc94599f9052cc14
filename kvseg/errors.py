"""Errors a user can act on.

Every error kvseg raises for bad input is a :class:`KvsegError`: its message is one line that names
the file or key at fault and what was expected. The command-line scripts print that line and exit
with status 2 instead of showing a traceback (see :func:`kvseg.cli.run_cli`); :func:`user_message`
is that line.
"""


class KvsegError(Exception):
    """Base class of the errors caused by input the user can fix."""


class ConfigError(KvsegError):
    """A configuration file or override has an unknown key, a wrong type or a bad value."""


class DatasetError(KvsegError):
    """A dataset folder does not have the expected layout or content."""


class DatasetNotFoundError(DatasetError):
    """The dataset folder, or its images/ or masks/ folder, does not exist."""


class EmptyDatasetError(DatasetError):
    """The dataset folder holds no images."""


class MissingMaskError(DatasetError):
    """Some images have no mask with the same file stem."""


class OrphanMaskError(DatasetError):
    """Some masks have no image with the same file stem."""


class CorruptImageError(DatasetError):
    """An image or mask file cannot be decoded (unreadable, truncated or not an image)."""


class ImageTooLargeError(CorruptImageError):
    """An image has more pixels than Pillow's decompression-bomb guard allows (``PIL.Image.MAX_IMAGE_PIXELS``)."""

    def __init__(self, message: str, pixels: int = 0, limit: int | None = None) -> None:
        super().__init__(message)
        self.pixels, self.limit = pixels, limit


class MaskEncodingError(DatasetError):
    """A mask's values fit no encoding, or not the one decided for its dataset."""


class SplitError(DatasetError):
    """A split file names an id that is not in the dataset, or a split is empty."""


class CheckpointError(KvsegError):
    """A checkpoint or run folder is missing, corrupt or does not match the model."""


EXIT_PREEMPTED = 75  # EX_TEMPFAIL of sysexits.h: "temporary failure; the user is invited to retry"


class Preempted(Exception):
    """Training stopped on a stop signal (SIGUSR1, SIGTERM) after saving its resume state; not an error.

    The command prints its message as one line and exits with :data:`EXIT_PREEMPTED`: the same
    command with ``--resume auto`` continues from the saved step.
    """


def user_message(exc: KvsegError) -> str:
    """The one-line message of ``exc``.

    An error raised in a DataLoader worker reaches the main process re-wrapped with the worker's
    traceback in its message; its own message is the last line, after the class name.
    """
    lines = [line for line in str(exc).splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    last = lines[-1]
    prefix = f"{type(exc).__module__}.{type(exc).__name__}: "
    return last[len(prefix):] if last.startswith(prefix) else last
