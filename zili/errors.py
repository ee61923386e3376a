"""Typed exceptions a user can act on. The CLI prints their message as one line."""


class ZiliError(Exception):
    """Base class for every error zili raises on purpose."""


class ModelLoadError(ZiliError):
    """A model folder, its config or its weights cannot be used."""


class UnsupportedArchitectureError(ModelLoadError):
    """config.json names an architecture no implementation is registered for."""


class CheckpointFormatError(ModelLoadError):
    """Weight files are missing, truncated, malformed or of a refused format (pickle)."""


class TokenizerError(ZiliError):
    """The tokenizer or chat template cannot be loaded or rendered."""


class InvalidRequestError(ZiliError, ValueError):
    """A request's parameters are out of range. `param` names the offending field."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param
