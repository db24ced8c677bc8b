"""Typed errors raised at the boundaries (data, config, API). Each message names the input and the fix."""

from __future__ import annotations


class LlavaDeftError(Exception):
    """Base class of every error this package raises on purpose."""


class MediaCountMismatchError(LlavaDeftError, ValueError):
    """A sample's prompt has a different number of media placeholders than media files."""

    def __init__(self, sample_id: str, placeholder: str, n_placeholders: int, n_media: int):
        self.sample_id, self.n_placeholders, self.n_media = sample_id, n_placeholders, n_media
        super().__init__(
            f"sample {sample_id!r}: the prompt has {n_placeholders} {placeholder} placeholder(s) but "
            f"{n_media} media item(s) were given; put exactly one {placeholder} in the text per media item"
        )


class EmptyLabelsError(LlavaDeftError, ValueError):
    """Every label of a training sample is masked, so it would contribute a silent zero loss."""

    def __init__(self, sample_id: str, reason: str = ""):
        self.sample_id = sample_id
        extra = f" ({reason})" if reason else ""
        super().__init__(
            f"sample {sample_id!r} has no assistant tokens to learn from: all labels are masked{extra}; "
            f"check that it has a non-empty 'gpt' turn and fits in max_length"
        )


class SampleTooLongError(LlavaDeftError, ValueError):
    """Truncation would cut a media span or every answer; the sample is refused, never cut."""


class DatasetFormatError(LlavaDeftError, ValueError):
    """A dataset file is not in the expected (LLaVA conversation JSON) format."""


class MediaFileError(LlavaDeftError, FileNotFoundError):
    """A media file is missing or cannot be decoded."""


class VideoError(MediaFileError):
    """A video file exists but cannot be used: empty, corrupt or unreadable, or without frames.

    ``VideoError(message)`` with one argument keeps ``message`` whole: that is how pickle and a
    DataLoader worker's re-raise rebuild the error, so it arrives in the main process with its type.
    """

    def __init__(self, path: str, problem: str | None = None):
        self.path, self.problem = str(path), problem
        super().__init__(str(path) if problem is None else f"video file '{path}': {problem}")


class CheckpointError(LlavaDeftError, ValueError):
    """A checkpoint directory is missing files or does not match the model config."""


class ConfigError(LlavaDeftError, ValueError):
    """A model/training config failed validation; the message lists every problem with its path."""


class AudioError(MediaFileError):
    """An audio file cannot be used: missing, unreadable or corrupt, empty (0 samples) or non-finite.

    ``AudioError(message)`` with one argument keeps ``message`` whole, so pickling (a DataLoader
    worker's re-raise) rebuilds the error with its type.
    """

    def __init__(self, path: str, problem: str | None = None):
        self.path, self.problem = str(path), problem
        super().__init__(str(path) if problem is None else f"audio file '{path}': {problem}")


class TaskDataError(LlavaDeftError, FileNotFoundError):
    """A generated task's data (``<tasks dir>/<task>/<split>.json``) is missing; the message names the
    command that generates it."""


class ReferenceResultError(LlavaDeftError, ValueError):
    """A result JSON given as a reference (``eval/tasks.py --reference``) is missing, not JSON, not an
    ``eval/tasks.py`` result, or not comparable with this run (another split); the message names the file."""
