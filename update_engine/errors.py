"""The errors of the update path, each carrying the Omaha error code the daemon reports for it.

The code is data, set where the error is raised (or fixed by the error's class), never guessed
from the message: ``ApplyError(message, code)``; :func:`omaha_code` maps the format's own errors
(payload, signature) by class.
"""

from __future__ import annotations

from obelisk.errors import ObeliskError
from update_engine import omaha
from update_engine.payload import PayloadError, PayloadSignatureError


class ApplyError(ObeliskError, RuntimeError):
    """An apply step failed; ``code`` is the Omaha error code to report, ``str()`` one line for the user."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


class Stopped(ApplyError):
    """The daemon was asked to stop (SIGTERM) mid-apply; progress is kept for the next run."""

    def __init__(self) -> None:
        msg = "stopped before the update was staged; it resumes on the next run"
        super().__init__(msg, omaha.ERR_DOWNLOAD_TRANSFER)


def omaha_code(exc: PayloadError) -> int:
    """The Omaha code of a refused payload, by the error's class."""
    return omaha.ERR_SIGNATURE if isinstance(exc, PayloadSignatureError) else omaha.ERR_PAYLOAD_VERIFICATION


def payload_failure(exc: PayloadError) -> ApplyError:
    return ApplyError(str(exc), omaha_code(exc))
