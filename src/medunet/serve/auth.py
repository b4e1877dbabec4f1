"""The optional access token of ``medunet serve --token``.

Clients send ``Authorization: Bearer <token>``. The page, opened in a browser that cannot set
headers on navigation, also takes it once as ``/?token=<token>``: its script keeps it in the
tab's ``sessionStorage``, removes it from the address bar and sends the header on every API
call. ``/health`` (liveness probes), ``/static/*`` (the page's own code) and the API docs stay
open; they hold no patient data and no model output.
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
import re
from pathlib import Path

from medunet.errors import InputError

_TOKEN_CHARS = re.compile(r"[\x21-\x7e]+")  # printable ASCII without spaces: safe in a header
TOKEN_QUERY = "token"


def check_token(token: str | None) -> str | None:
    """The token as given, or None; refuse one that cannot travel in an HTTP header."""
    if token is None:
        return None
    if not _TOKEN_CHARS.fullmatch(token):
        raise InputError("the access token must be printable ASCII without spaces and not empty",
                         fix="e.g. --token $(python -c 'import secrets; print(secrets.token_urlsafe(24))')")
    return token


def read_token_file(path: str | Path) -> str:
    """The token in the first line of ``path`` (keeps it out of ``ps`` output and shell history)."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"cannot read the token file ({type(exc).__name__})", path,
                         "write the token on the first line of a readable UTF-8 file") from exc
    token = lines[0].strip() if lines else ""
    if not token:
        raise InputError("the token file is empty", path, "write the token on its first line")
    return check_token(token) or ""


def token_matches(expected: str, authorization: str | None, query_token: str | None = None) -> bool:
    """Whether the ``Authorization`` header (or, when given, the query token) holds ``expected``.

    Compared in constant time, so response timing does not reveal how much of a guess was right.
    """
    given = None
    if authorization:
        scheme, _, value = authorization.partition(" ")
        if scheme.lower() == "bearer":
            given = value.strip()
    if given is None:
        given = query_token
    if not given:
        return False
    return hmac.compare_digest(given.encode("utf-8", "replace"), expected.encode("utf-8"))


def is_loopback(host: str) -> bool:
    """True for addresses only this machine can reach (``localhost``, 127.0.0.0/8, ``::1``)."""
    name = host.strip().strip("[]").lower()
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to any interface


def exposure_warning(host: str, token: str | None) -> str | None:
    """The warning to print when the server listens beyond this machine without a token."""
    if token or is_loopback(host):
        return None
    return (f"warning: listening on {host} without an access token: anyone who can reach this port can "
            "upload images and read the results; add --token (or --token-file), or put the server "
            "behind an authenticating proxy")


class RedactTokenFilter(logging.Filter):
    """Hide ``token=...`` in access-log lines (the page is opened once as ``/?token=...``)."""

    _pattern = re.compile(r"(?i)(\btoken=)[^&\s\"]*")

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple):
            record.args = tuple(self._pattern.sub(r"\1***", a) if isinstance(a, str) else a
                                for a in record.args)
        elif isinstance(record.msg, str):
            record.msg = self._pattern.sub(r"\1***", record.msg)
        return True
