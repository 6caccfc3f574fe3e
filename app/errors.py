"""Errors named as facts. Each carries the HTTP status and a stable code;
app/http/errors.py is the one place that turns them into responses, and the
CLI's one error boundary (app/cli/__init__.py) into a line on stderr."""
from __future__ import annotations


class ServingError(Exception):
    status = 500
    code = "internal_error"

    def __init__(self, message: str, **details):
        super().__init__(message)
        self.message = message
        self.details = details


class InvalidJSON(ServingError):
    status, code = 400, "invalid_json"


class MissingField(ServingError):
    status, code = 400, "missing_field"


class InvalidField(ServingError):
    status, code = 422, "invalid_field"


class InvalidFeatures(ServingError):
    status, code = 422, "invalid_features"


class InvalidInput(ServingError):
    """A V2 inference request whose tensors, outputs or parameters cannot be used as they are."""
    status, code = 400, "invalid_input"


class UnsupportedMediaType(ServingError):
    status, code = 415, "unsupported_media_type"


class BodyTooLarge(ServingError):
    status, code = 413, "body_too_large"


class BatchTooLarge(ServingError):
    status, code = 413, "batch_too_large"


class NotFound(ServingError):
    status, code = 404, "not_found"


class ModelNotFound(ServingError):
    status, code = 404, "model_not_found"


class VersionNotFound(ServingError):
    status, code = 404, "version_not_found"


class ModelNotReady(ServingError):
    status, code = 503, "model_not_ready"


class RateLimited(ServingError):
    status, code = 429, "rate_limited"


class ModelFailed(ServingError):
    """The model raised on rows that passed validation (a batch fails together)."""
    status, code = 500, "model_error"


class InvalidModel(ServingError):
    """An artifact, or a model's files, that must not go live (bad checksum,
    fails to load or verify, an unreadable serving.json). Reloads catch it and
    keep what serves; a request that meets it is answered 422."""
    status, code = 422, "model_refused"


class Unauthorized(ServingError):
    status, code = 401, "unauthorized"


class Forbidden(ServingError):
    status, code = 403, "forbidden"


class Conflict(ServingError):
    status, code = 409, "conflict"


class ModelRefused(ServingError):
    """A version that must not serve: it failed to load or to verify."""
    status, code = 422, "model_refused"


class InvalidData(ServingError):
    """Data handed to the CLI or the core (a training CSV, say) that cannot be used as it is."""
    status, code = 422, "invalid_data"


class DeadlineExceeded(ServingError):
    """The request's deadline passed before its answer was ready."""
    status, code = 504, "deadline_exceeded"


class InvalidHeader(ServingError):
    status, code = 400, "invalid_header"


class UriTooLong(ServingError):
    status, code = 414, "uri_too_long"


class HeaderTooLarge(ServingError):
    status, code = 431, "header_too_large"


class InsufficientStorage(ServingError):
    """The models directory is full; what was asked for was not written."""
    status, code = 507, "insufficient_storage"
