"""Errors that llmc reports to the user as one line, without a traceback.

Every message names the problem and the fix. The CLI catches `LlmcError`, prints
`llmc: error: <message>` and exits with status 2.
"""


class LlmcError(Exception):
    """A problem with the user's input (config, files, model, data), not a bug."""


class ConfigError(LlmcError):
    """The YAML config is malformed or has an invalid or unknown key."""


class DataError(LlmcError):
    """A calibration or evaluation data set is missing, empty or unreadable."""


class ModelError(LlmcError):
    """The model cannot be loaded, has no adapter, or does not fit the config."""


class NumericsError(LlmcError):
    """NaN or Inf appeared in activations during calibration or evaluation."""


class OutputError(LlmcError):
    """An output or a resume checkpoint could not be written (disk full, permissions)."""
