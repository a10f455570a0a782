"""The base of every error a user can fix: a file, setting, shard, model or run directory that the
message names. The CLI prints any of them as one ``crosscoder: <Type>: <message>`` line (exit 1)
instead of a traceback, so a new error type only has to derive from :class:`CrosscoderError`.
Each one also keeps the built-in base it had (ValueError, OSError, …), so callers' ``except``
clauses still hold. Anything else is a bug and keeps its traceback. A library's error beneath one
of ours (transformers, datasets, Ray) is told by its first line (``message_line``,
``type_and_message``), never by its traceback."""


class CrosscoderError(Exception):
    """A failure the user can fix; the message says what and where."""


class NoRunDirectory(CrosscoderError, FileNotFoundError):
    """A command that reads a run directory was given one that does not exist (a typo, another
    working directory); said before anything is written, so the typo leaves no directory behind."""

    def __init__(self, run_dir) -> None:
        super().__init__(f"{run_dir}: no such run directory (`crosscoder run` or `crosscoder train` makes one, "
                         "under runs/<name> by default)")


class AnalysisError(CrosscoderError, ValueError):
    """The run or its data cannot be analysed, or its analysis read (``compare``); the message says
    which file or setting."""


class ExportUnreadable(CrosscoderError, ValueError):
    """A crosscoder export whose ``config.json`` or ``model.safetensors`` is not what an export
    writes (cut short, edited); a run's own is written again from its last checkpoint."""


def message_line(error: BaseException) -> str:
    """The first non-blank line of an error's message (its type's name where it has none): a
    library's error (a transformers OSError, a datasets failure) told inside one line of ours."""
    return _first_line(error) or type(error).__name__


def type_and_message(error: BaseException) -> str:
    """``Type: first line`` of an error (``Type`` alone where it has no message), for a message
    that names what failed beneath it."""
    line = _first_line(error)
    return f"{type(error).__name__}: {line}" if line else type(error).__name__


def _first_line(error: BaseException) -> str:
    return next((line.strip() for line in str(error).splitlines() if line.strip()), "")
