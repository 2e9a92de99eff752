"""Errors a user can act on. Their ``str`` is one line that names the problem."""


class SafeFMError(Exception):
    """Base class: the CLI prints ``error: <message>`` and exits non-zero."""


class ConfigError(SafeFMError):
    pass


class IdentityFileError(SafeFMError):
    pass


class WeightsError(SafeFMError):
    pass


class InputError(SafeFMError):
    pass


class DeviceError(SafeFMError):
    pass


def first_line(exc: BaseException, filename: bool = True) -> str:
    """An exception's message as one line for a user: the first non-empty line of ``str(exc)``,
    or for an OS-style error (``strerror`` set: OSError, PyAV's errors) its ``strerror``, followed
    by ``: <filename>`` when it has one and ``filename`` is true (False where the caller's message
    names the file already); the type name when there is no message."""
    strerror = getattr(exc, "strerror", None)
    if strerror:
        name = getattr(exc, "filename", None) if filename else None
        text = f"{strerror}: {name}" if name else str(strerror)
    else:
        text = str(exc)
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return lines[0] if lines else type(exc).__name__
