"""The authenticator interface shared by the local accounts file and RADIUS.

An authenticator's ``authenticate(user, password, state, client)`` returns a Deferred that fires with one of
:class:`Accept`, :class:`Reject` or :class:`Challenge`, or fails with
:class:`getcertd.errors.AuthUnavailable` when the backend can't be reached.
``state`` is None on a first attempt, or the opaque backend state from a previous :class:`Challenge`
(RADIUS State) when the password is a response to that challenge.
"""
from dataclasses import dataclass, field
from typing import Mapping, Optional, Tuple

from zope.interface import Interface


@dataclass(frozen=True)
class Identity:
    """Who authenticated, how, and what the backend said about them (feeds policy)."""
    user: str
    method: str  # "local", "radius-pap", "radius-challenge", "challengePassword"
    session_timeout: Optional[int] = None  # seconds; caps the certificate lifetime
    profile_hint: Optional[str] = None  # e.g. RADIUS Class or Filter-Id
    attributes: Mapping[str, Tuple] = field(default_factory=dict)


@dataclass(frozen=True)
class Accept:
    identity: Identity


@dataclass(frozen=True)
class Reject:
    reason: str  # for the log only; never shown to the client (it must not reveal whether the user exists)


@dataclass(frozen=True)
class Challenge:
    message: str  # shown to the user (RADIUS Reply-Message)
    state: bytes  # opaque backend state, kept server-side


class IAuthenticator(Interface):
    """A password/token/challenge-response checker."""

    name = "short backend name for logs and metrics, e.g. 'local' or 'radius'"

    def authenticate(user, password, state, client):
        """Check ``password`` (bytes) for ``user`` (str); return a Deferred of Accept | Reject | Challenge."""
