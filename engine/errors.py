"""One exception family. Every message says what went wrong and what to do about it."""


def first_line(exc: BaseException) -> str:
    """An exception's first line: the CLI prints an error as one line, and library messages run to many."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


class EngineError(Exception):
    """Base class: the CLI prints these without a traceback and exits with status 2."""

    exit_code = 2


class ConfigError(EngineError):
    """A config file or a ``key=value`` override is invalid."""


class DataError(EngineError):
    """The data (or the forget request) cannot be used as asked."""


class ModelError(EngineError):
    """A checkpoint cannot be loaded or does not fit the data."""


class OutputError(EngineError):
    """The output folder cannot be written as asked."""


class DivergenceError(EngineError):
    """A loss became non-finite: training stopped before committing the bad step."""

    exit_code = 3


class CheckpointError(EngineError):
    """A checkpoint cannot be written, or cannot be resumed from as asked."""


class PreemptedError(EngineError):
    """SIGTERM (preemption, `scancel`, a stopped job): a checkpoint was written at the step boundary.
    Exit status 75 (EX_TEMPFAIL): run the same command again to resume."""

    exit_code = 75
