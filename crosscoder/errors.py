"""The base of every error a user can fix: a file, setting, shard, model or run directory that the
message names. The CLI prints any of them as one ``crosscoder: <Type>: <message>`` line (exit 1)
instead of a traceback, so a new error type only has to derive from :class:`CrosscoderError`.
Each one also keeps the built-in base it had (ValueError, OSError, …), so callers' ``except``
clauses still hold. Anything else is a bug and keeps its traceback."""


class CrosscoderError(Exception):
    """A failure the user can fix; the message says what and where."""
