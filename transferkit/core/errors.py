"""One error taxonomy for every stage.

Each class carries the HTTP status a service should answer with and the exit code a CLI should end with, so the
mapping lives with the error and not in every caller. Messages say what was expected and what was found.
"""

from __future__ import annotations


class TransferkitError(Exception):
    """Base class: an error a user can act on. ``str(err)`` is the one line to show them."""

    http_status: int = 500
    exit_code: int = 1
    reason: str = "error"


class UsageError(TransferkitError):
    """Arguments or configuration that cannot work together."""

    http_status = 400
    exit_code = 2
    reason = "bad_argument"


class NoClassActivationMap(UsageError):
    """The bundle, or the backend running it, has no trustworthy class activation map (the message says why)."""

    http_status = 404
    reason = "no_class_activation_map"


class DatasetError(TransferkitError):
    """A dataset directory that cannot be trained on (missing, too few classes, an empty class...)."""

    http_status = 400
    exit_code = 2
    reason = "bad_dataset"


class OutputExistsError(TransferkitError):
    """The output directory exists and ``--force`` was not given."""

    http_status = 409
    exit_code = 2
    reason = "output_exists"


class WeightsUnavailableError(TransferkitError):
    """Pretrained weights could not be loaded (offline, wrong file, wrong backbone)."""

    http_status = 500
    exit_code = 3
    reason = "weights_unavailable"


class InvalidImageError(TransferkitError):
    """Bytes that are not a supported, complete image."""

    http_status = 400
    exit_code = 2
    reason = "invalid_image"


class ImageTooLargeError(InvalidImageError):
    """An image whose declared pixel count exceeds the cap (refused from its header, before decoding)."""

    http_status = 413
    reason = "image_too_large"


class RunDirectoryError(TransferkitError):
    """A training run directory that is missing files or does not match what was asked."""

    http_status = 400
    exit_code = 2
    reason = "bad_run"


class BundleError(TransferkitError):
    """A bundle that cannot be used: missing manifest, missing format, or a file that fails its checksum."""

    http_status = 500
    exit_code = 2
    reason = "bad_bundle"


class ExportValidationError(TransferkitError):
    """An exported format does not answer like the Keras model within its gate."""

    http_status = 500
    exit_code = 4
    reason = "export_mismatch"


class ServiceError(TransferkitError):
    """What a service answers instead of a result: an HTTP status, a machine-readable reason, one line for a person
    and, when retrying helps, the seconds to wait (``Retry-After``).

    Unlike the classes above, status and reason belong to the instance: one refusal type serves every check of a
    request (bad input, a full decode budget, a model still warming), and the service turns any of them into the
    same JSON answer (``transferkit.service.errors.error_response``)."""

    exit_code = 1

    def __init__(self, status: int, reason: str, message: str, retry_after: int | None = None):
        super().__init__(message)
        self.http_status, self.reason, self.message, self.retry_after = status, reason, message, retry_after

    @property
    def status(self) -> int:
        return self.http_status


class ModelUnavailable(ServiceError):
    """The model cannot answer (503): still warming (retryable, with ``retry_after``) or failed to load (not)."""

    def __init__(self, reason: str, message: str, retry_after: int | None = None):
        super().__init__(503, reason, message, retry_after)
