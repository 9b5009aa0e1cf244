"""Errors a user can fix. The CLI prints them as one line, without a traceback."""

import re

# `--max-length 5`, `--template 'x'`, `--chat-template FILE`, or a bare `--resume`
_FLAG = re.compile(
    r"--([a-z][a-z0-9-]*)(?: (-?\d[\w.]*|'[^']*'|\"[^\"]*\"|[A-Z][A-Z_]+)(?![\w=]))?"
)
SWITCHES: set[str] = set()  # flags without a value (config.py adds them): `resume=True`


class SoftpromptError(Exception):
    """Base class: the message says what is wrong and what to do."""

    @property
    def cli_message(self) -> str:
        """The message as the command line shows it."""
        return str(self)


class ConfigError(SoftpromptError):
    """A bad option value. The message is written with the command line's flags, which the
    CLI prints (``cli_message``: "--max-length 5 leaves no room ..."); from Python, ``str``
    names the arguments instead ("max_length=5 leaves no room ...", "resume=True")."""

    @property
    def cli_message(self) -> str:
        return self.args[0] if self.args else ""

    def __str__(self) -> str:
        return _FLAG.sub(_argument, self.cli_message)


def _argument(match: re.Match) -> str:
    name, value = match.group(1).replace("-", "_"), match.group(2)
    if value is not None:
        return f"{name}={value}"
    return f"{name}=True" if name in SWITCHES else name


class DataError(SoftpromptError):
    """A bad or empty data file; the message names the file and line."""


class ModelLoadError(SoftpromptError):
    """The base model could not be found or loaded."""


class PrecisionError(ModelLoadError):
    """The model's own code failed in the reduced precision it was loaded in (bfloat16 or
    float16) when run as a soft prompt runs it; float32 was not tried. ``--dtype auto``
    loads such a model again in float32, saying ``failure`` (what failed, without advice)."""

    def __init__(self, failure: str) -> None:
        super().__init__(f"{failure}; --dtype float32 may run it")
        self.failure = failure


class ArtifactError(SoftpromptError):
    """A saved prompt is missing, corrupt, or belongs to another base model."""


class TrainingError(SoftpromptError):
    """Training had to stop (for example on a non-finite loss)."""


def first_line(err: BaseException) -> str:
    """An exception's first line (its type's name if it has no message): what a one-line
    refusal quotes of a library's error."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
