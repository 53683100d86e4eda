"""User-facing errors. The CLI prints their message on one line and exits non-zero.

Raise these (never a bare exception) for anything a user can fix: the message names the file
and says what to do.
"""


class PallmError(Exception):
    """A problem with the user's input, config or environment."""


class ManifestError(PallmError):
    pass


class AudioError(PallmError):
    pass


class ConfigError(PallmError):
    pass


class CorpusLayoutError(PallmError):
    pass
