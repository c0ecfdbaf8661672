"""Errors a user can act on.

Every failure that bad input can cause is raised as a `PagodaError` subclass whose message says
what was wrong and what to do. The CLI prints the message on one line (no traceback unless
`--debug`); the server maps `http_status`/`error_type` onto OpenAI-format error bodies.
"""


class PagodaError(Exception):
    """Base class: a problem the user can fix, described in one readable line."""

    http_status: int = 400
    error_type: str = "invalid_request_error"
    code: str | None = None


class ConfigError(PagodaError):
    """A model/training config or preset is unknown or inconsistent."""


class ModelNotFoundError(PagodaError):
    """A model name, path or preset does not resolve to anything."""

    http_status = 404
    code = "model_not_found"


class WeightsError(PagodaError):
    """A weights file (GGUF, safetensors, config.json) is missing, truncated or corrupt."""

    http_status = 500
    error_type = "server_error"


class PullError(PagodaError):
    """Fetching a model from its source failed (offline, bad hash, unknown source)."""

    http_status = 502
    error_type = "server_error"


class InvalidRequestError(PagodaError):
    """A generation request has invalid values (sampling parameters, empty prompt, ...)."""


class ContextLengthError(InvalidRequestError):
    """The prompt (plus requested tokens) does not fit the model's context window."""

    code = "context_length_exceeded"


class QueueFullError(PagodaError):
    """The engine's waiting queue is full; the client should retry later."""

    http_status = 503
    error_type = "server_error"
    code = "queue_full"


class DocumentError(PagodaError):
    """A file given to a knowledge base cannot be read: unsupported type, empty, binary, corrupt.

    Its own class (not `InvalidRequestError`) so that ingesting many files can skip and report
    the bad ones while every other failure still stops the run.
    """

    code = "invalid_document"


class ClientError(PagodaError):
    """A model endpoint the client talks to is unreachable or answered with an error."""

    http_status = 502
    error_type = "server_error"
    code = "upstream_error"
