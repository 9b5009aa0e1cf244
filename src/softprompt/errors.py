"""Errors a user can fix. The CLI prints them as one line, without a traceback."""


class SoftpromptError(Exception):
    """Base class: the message says what is wrong and what to do."""


class ConfigError(SoftpromptError):
    """A bad option value."""


class DataError(SoftpromptError):
    """A bad or empty data file; the message names the file and line."""


class ModelLoadError(SoftpromptError):
    """The base model could not be found or loaded."""


class ArtifactError(SoftpromptError):
    """A saved prompt is missing, corrupt, or belongs to another base model."""


class TrainingError(SoftpromptError):
    """Training had to stop (for example on a non-finite loss)."""
