"""The typed errors a user can cause. Every stage raises these; the API maps them to 4xx JSON.

Messages never contain PHI (patient names, IDs, dates): they describe the file, not the patient.
"""

from __future__ import annotations


class CTHubError(Exception):
    """Base of every error a user can cause. `http_status` is what the API answers with."""

    http_status: int = 400
    code: str = "bad_request"

    def to_dict(self) -> dict[str, str]:
        return {"error": self.code, "type": type(self).__name__, "detail": str(self)}


class InputError(CTHubError):
    """An input image or file cannot be used (not DICOM, truncated, no pixels, unsupported...)."""

    code = "invalid_input"


class ShapeError(InputError):
    """An array or tensor has the wrong shape or dimensions for the model."""

    code = "invalid_shape"


class ModelNotFoundError(CTHubError):
    """A model name or path does not resolve to weights."""

    http_status = 404
    code = "model_not_found"


class IntegrityError(CTHubError):
    """Weights on disk do not match their recorded checksum or key layout."""

    http_status = 500
    code = "integrity_error"


class DataError(CTHubError):
    """A dataset (folder, CSV, npz) is missing, malformed or fails its checksum."""

    code = "data_error"


class MissingSplitError(DataError):
    """A dataset does not define a split (train/val/test) that the chosen protocol needs."""

    code = "missing_split"


class ConfigError(CTHubError):
    """An option or configuration value is invalid."""

    code = "config_error"


class PayloadTooLargeError(InputError):
    """An upload exceeds the configured size limit."""

    http_status = 413
    code = "payload_too_large"


class UnsupportedMediaError(InputError):
    """An upload in a format or encoding the service cannot decode (e.g. an unknown transfer syntax)."""

    http_status = 415
    code = "unsupported_media_type"


class UnprocessableInputError(InputError):
    """A well-formed upload that is not what the model can analyse (no pixels, not a grey-level CT...)."""

    http_status = 422
    code = "unprocessable_input"


class AuthError(CTHubError):
    """A request without the bearer token the server requires."""

    http_status = 401
    code = "unauthorized"


class ServiceBusyError(CTHubError):
    """The inference service cannot take more work within its latency budget; retry later."""

    http_status = 503
    code = "overloaded"


class StaleModelError(IntegrityError):
    """An exported model no longer matches its source: its weights or preprocessing changed since export."""

    code = "stale_model"


class ToleranceError(IntegrityError):
    """A converted model (ONNX export, int8 quantization) does not reproduce its source within the configured
    tolerance; the file was not written."""

    code = "tolerance_exceeded"
