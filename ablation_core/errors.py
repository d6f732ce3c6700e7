"""The errors this package raises. Each message says what went wrong and what to do about it."""


class AblationError(Exception):
    """Base class: anything a user can fix by changing their input."""


class UnsupportedModelError(AblationError):
    """The model is not a Stable Diffusion family this tool can edit (or the file is not a model at all)."""


class PromptError(AblationError):
    """Target/anchor prompts are empty, identical, or otherwise unusable."""


class PatchError(AblationError):
    """A patch file is corrupt, unreadable, or does not fit the model it is applied to."""


class PatchMismatchError(PatchError):
    """The patch was made for another base model (its fingerprint differs) and strict checking was asked for."""


class TrainingDivergedError(AblationError):
    """The loss became NaN or infinite; nothing was written."""


class AblationCancelled(AblationError):
    """The user cancelled the run; nothing was written and the model is unchanged."""


class OutOfMemoryError(AblationError):
    """The device ran out of memory; the message suggests smaller settings."""


def printable(text: str) -> str:
    """``text`` on one line: control characters (a newline, an escape) written as escapes, everything else as is."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def quoted(text: str, limit: int = 80) -> str:
    """A name taken from a file or an argument, fit for a one-line message: quoted, control characters escaped
    (a name may hold a newline), and cut short (or it may be megabytes long)."""
    shown = printable(text[:limit + 1])
    return f"'{shown[:limit]}...'" if len(shown) > limit else f"'{shown}'"
