"""Typed errors that cross layers. One place (getcertd.web) maps them to protocol answers."""
from contextlib import contextmanager
from enum import IntEnum
from typing import Optional


class FailInfo(IntEnum):
    """SCEP failInfo values (RFC 8894 section 3.2.1.4.5)."""
    badAlg = 0
    badMessageCheck = 1
    badRequest = 2
    badTime = 3
    badCertId = 4


class GetcertdError(Exception):
    """Base of getcertd's typed errors."""


class MalformedRequest(GetcertdError):
    """Input that can't be parsed at all: answered with HTTP 400 and this one-line reason."""


class ScepFailure(GetcertdError):
    """A request that was parsed but can't be granted: answered with a FAILURE CertRep."""

    def __init__(self, fail_info: FailInfo, text: str, detail: Optional[str] = None):
        super().__init__(f"{fail_info.name}: {text}" + (f" ({detail})" if detail else ""))
        self.fail_info = fail_info
        self.text = text  # what the client is told (failInfoText)
        self.detail = detail  # more, for the appliance's log only
        self.user = None  # who asked, once authenticated (for the log)


@contextmanager
def refusals_name(user: str):
    """A ScepFailure raised in the block names ``user`` (the authenticated requester) in the log."""
    try:
        yield
    except ScepFailure as failure:
        if failure.user is None:
            failure.user = user
        raise


class AuthUnavailable(GetcertdError):
    """The authentication backend could not be reached: HTTP 503 with Retry-After, or FAILURE CertRep."""


class StorageUnavailable(GetcertdError):
    """The journal could not record an issuance: HTTP 503, no certificate leaves the server."""


class KeyJobFailed(GetcertdError):
    """Work for the CA or RA key failed unexpectedly (its key helper process ended, or a bug): HTTP 503, logged."""


class ConfigError(GetcertdError):
    """A configuration problem, reported at start with a message naming the file, section and key."""


class AuthenticationRequired(GetcertdError):
    """HTTP 401 with WWW-Authenticate; with ``message`` and ``token`` when the backend issued a challenge."""

    def __init__(self, message: str = "", token: str = ""):
        super().__init__(message or "authentication required")
        self.message = message
        self.token = token


class Throttled(GetcertdError):
    """Too many failed authentications for this user or address: HTTP 429 with Retry-After."""

    def __init__(self, retry_after: float, reason: str = "too many failed attempts"):
        self.retry_after = max(1, int(retry_after + 0.999))
        super().__init__(f"{reason}; try again in {self.retry_after} s")
