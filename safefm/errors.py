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
