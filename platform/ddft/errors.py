"""The library's typed errors: what kind of problem, never how a transport reports it.

Every error has a stable snake_case `code` (clients match on it) and a message that says what was
wrong and how to fix it. The HTTP status and the OpenAI error shape of each kind are decided in one
table at the ingress (serve/errors.py); the CLI prints the message.
"""

from __future__ import annotations


class DdftError(Exception):
    default_code = "error"

    def __init__(self, detail: str, code: str | None = None):
        super().__init__(detail)
        self.detail = detail
        self.code = code or self.default_code


class NotFound(DdftError, LookupError):
    """It does not exist, or it isn't the caller's to see (the same answer, on purpose)."""

    default_code = "not_found"


class Conflict(DdftError):
    """It exists, but it clashes with what is there: another base, a name taken, a race lost."""

    default_code = "conflict"


class BadArgument(DdftError, ValueError):
    """An argument is malformed: a name, a reference, the shape of a call."""

    default_code = "bad_argument"


class Invalid(DdftError, ValueError):
    """Well-formed, but its content can't be used (a broken file, an unsupported setting)."""

    default_code = "invalid"


class BadConstraint(Invalid):
    """A grammar or JSON Schema (OpenAI's response_format) that can't constrain decoding: it doesn't
    compile, or it uses a keyword the decoder would not enforce. A well-formed request whose content
    can't be used: a malformed response_format is refused before, as the request's own shape."""

    default_code = "bad_response_format"


class TooLarge(Invalid):
    default_code = "too_large"


class UnsupportedFormat(Invalid):
    """A format refused on principle (pickled weights)."""

    default_code = "unsupported_format"


class Unavailable(DdftError, RuntimeError):
    """Can't be done now (an engine that can't start, a store that can't be reached): retry later."""

    default_code = "unavailable"
