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
    """A dataset file is not in the expected (LLaVA conversation JSON) format. Raised for a whole file
    at once: ``problems`` (when set) holds one error per bad record."""


class MediaPathError(DatasetFormatError):
    """A record's media path is absolute or leads outside the media folder (``..``, a symlink); the
    message names the record, the key and the JSON file, never what lies outside."""


class MediaFileError(LlavaDeftError, FileNotFoundError):
    """A media file is missing or cannot be decoded."""


class _FileProblem(Exception):
    """``Error(path, problem)`` reads ``{noun} '{path}': {problem}``. ``Error(message)`` with one
    argument keeps ``message`` whole: that is how pickle and a DataLoader worker's re-raise rebuild the
    error, so it arrives in the main process with its type."""

    noun = "file"

    def __init__(self, path: str, problem: str | None = None, noun: str | None = None):
        self.path, self.problem, self.noun = str(path), problem, noun or self.noun
        super().__init__(str(path) if problem is None else f"{self.noun} '{path}': {problem}")

    def located(self, where: str) -> "_FileProblem":
        """The same error with ``where`` (e.g. ``(sample 'x' of train.json)``) after its problem."""
        if self.problem is None or not where:
            return self
        return type(self)(self.path, f"{self.problem} {where}", self.noun)


class VideoError(_FileProblem, MediaFileError):
    """A video file exists but cannot be used: empty, corrupt or unreadable, or without frames."""

    noun = "video file"


class MediaLimitError(_FileProblem, LlavaDeftError, ValueError):
    """A media file is over a limit of the model config's ``limits:`` section (image pixels, video
    length or frame size, audio length), read from its header before anything is decoded; the message
    names the file, the limit and the key that raises it (``noun``: "image file", "video file", ...)."""

    noun = "media file"


class CheckpointError(LlavaDeftError, ValueError):
    """A checkpoint directory is missing files or does not match the model config."""


class ConfigError(LlavaDeftError, ValueError):
    """A model/training config failed validation; the message lists every problem with its path."""


class InvalidArgumentError(LlavaDeftError, ValueError):
    """An argument of the Python API (or the CLI flag behind it) has a value out of range; the message
    names the argument, its value and what is accepted."""


class UnsupportedInputError(LlavaDeftError, TypeError):
    """An input of the Python API has a type or shape it does not take; the message names the argument
    and what is accepted."""


class ContextLengthError(InvalidArgumentError):
    """The prompt plus ``max_new_tokens`` would run past the LLM's context (``max_position_embeddings``)."""

    def __init__(self, prompt_length: int, max_new_tokens: int, limit: int, sample: str = "the prompt"):
        self.prompt_length, self.max_new_tokens, self.limit = prompt_length, max_new_tokens, limit
        super().__init__(
            f"{sample} spans {prompt_length} positions and max_new_tokens={max_new_tokens}: "
            f"{prompt_length + max_new_tokens} > the LLM's context of {limit} positions (max_position_embeddings); "
            f"give max_new_tokens <= {max(limit - prompt_length, 0)} or a shorter prompt"
        )


class AudioError(_FileProblem, MediaFileError):
    """An audio file cannot be used: missing, unreadable or corrupt, empty (0 samples), non-finite or
    out of range samples, or log-mel features that are not finite."""

    noun = "audio file"


class TaskDataError(LlavaDeftError, FileNotFoundError):
    """A generated task's data (``<tasks dir>/<task>/<split>.json``) is missing; the message names the
    command that generates it."""


class ReferenceResultError(LlavaDeftError, ValueError):
    """A result JSON given as a reference (``eval/tasks.py --reference``) is missing, not JSON, not an
    ``eval/tasks.py`` result, or not comparable with this run (another split); the message names the file."""


class PickleCheckpointError(CheckpointError):
    """A checkpoint holds its weights only as pickles (``pytorch_model.bin``, ``*.pt``, ...), which are
    never loaded (unpickling runs code); the message gives the command that converts them."""

    @classmethod
    def in_dir(cls, directory, files: list[str], loader: str) -> "PickleCheckpointError":
        """The error for ``directory`` holding only the pickles ``files``; ``loader`` is the transformers
        class that reads them (``LlavaForConditionalGeneration``, ``AutoModelForCausalLM``, ...)."""
        return cls(
            f"'{directory}' holds its weights only as pickles ({', '.join(files)}), and llava-deft never "
            f"unpickles a file (it can run code). Convert it to safetensors on a machine where you trust the "
            f"file: python -c \"from transformers import {loader} as M; "
            f"M.from_pretrained('{directory}').save_pretrained('OUT', safe_serialization=True)\" "
            f"and load OUT instead"
        )


class UnsupportedCheckpointError(CheckpointError):
    """A checkpoint is well formed but uses something this package does not build (another vision
    tower, projector activation, several feature layers); the message names the key and its value."""


class VocabularyMismatchError(LlavaDeftError, ValueError):
    """The tokenizer has more tokens than the LLM has embedding rows (ids past the table would have no
    embedding); the message names both numbers and how to fix it."""
