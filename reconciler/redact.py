"""Keep database passwords (and other registered secrets) out of every output.

A secret is registered once, when the configuration is resolved; `redact()` then replaces it in any
text in every encoding it could take there: raw, URL-encoded (both `quote` and `quote_plus`), and
the doubled-percent form used for Alembic's configparser.

URLs are registered with `register_url`, the one way every module does it: the password as
SQLAlchemy reads it and as a person wrote it (up to the last `@`), so that a password holding an
unescaped `@` is registered whole. `redact()` also masks, in any URL whose authority holds several
`@`, everything between `://` and the last `@`: such a URL cannot be split into user, password and
host reliably, so none of it is shown.
"""

from __future__ import annotations

import re
import threading
from urllib.parse import quote, quote_plus, unquote

MASK = "***"
MIN_FRAGMENT = 4  # pieces of a password split at '@' shorter than this are not masked on their own
_lock = threading.Lock()
_variants: list[str] = []
_URL = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.\-]*://)(?P<rest>[^\s'\"<>`]*)")
# The start of SQLAlchemy's URL pattern (sqlalchemy.engine.url._parse_url, 1.4 to 2.x): its user part.
_SQLA_USER = re.compile(r"(?P<name>[\w\+]+)://(?:(?P<username>[^:/]*)(?::(?P<password>[^@]*))?@)?")


def _encodings(secret: str) -> set[str]:
    forms = {secret, quote(secret, safe=""), quote_plus(secret), quote(secret)}
    forms |= {f.replace("%", "%%") for f in list(forms)}
    forms |= {quote(f, safe="") for f in list(forms)}  # a URL-encoded URL inside another URL
    forms |= {repr(secret)[1:-1]}
    return {f for f in forms if f}


def register_secret(secret: str | None) -> None:
    """Remember a secret so that every later `redact()` masks it."""
    if not secret or len(secret) < 2:
        return
    with _lock:
        for form in _encodings(secret):
            if form not in _variants:
                _variants.append(form)
        _variants.sort(key=len, reverse=True)  # longest first: encoded forms contain raw parts


def userinfo(url: str) -> str | None:
    """Everything between `://` and the last `@` of the URL; None when it has no user part."""
    match = _URL.match(url.strip())
    if not match:
        return None
    return _userinfo_of(match.group("rest"))


def _userinfo_of(rest: str) -> str | None:
    if rest.startswith("/"):  # no authority (sqlite:////path/with@signs.db)
        return None
    at = rest.rfind("@")
    return rest[:at] if at >= 0 else None


def is_ambiguous(url: str) -> bool:
    """True when the URL's user part holds an unescaped `@` (several `@` before the host)."""
    info = userinfo(url)
    return info is not None and "@" in info


def _parsed_password(url: str) -> str | None:
    """The password as `sqlalchemy.engine.make_url(url).password` reads it (up to the first `@`,
    URL-decoded), with SQLAlchemy's own pattern: this module imports the standard library only."""
    match = _SQLA_USER.match(url)
    password = match.group("password") if match else None
    return unquote(password) if password else None


def register_url(url: str | None) -> None:
    """Register the password of a database (or webhook) URL in every form it may take: the one
    way to register a URL, for config, the worker and the worker client alike.

    The password as SQLAlchemy parses it and as written (after the first `:` of the user part, up
    to the last `@`), raw and URL-decoded, each in every encoding `register_secret` adds (raw,
    URL-encoded, `%%`-escaped); for a URL whose user part holds an unescaped `@`, that whole part
    (between `://` and the last `@`) too; for a password holding an `@`, escaped or not, each of
    its `@`-separated pieces of at least `MIN_FRAGMENT` characters (a parser that splits at the
    first `@` shows the rest as a host or port)."""
    if not url:
        return
    passwords = {_parsed_password(url) or ""}
    info = userinfo(url)
    if info is not None:
        _user, colon, written = info.partition(":")
        if colon:
            passwords |= {written, unquote(written)}
        if "@" in info:
            register_secret(info)
    for password in passwords:
        register_secret(password)
        pieces = password.split("@")
        for piece in pieces if len(pieces) > 1 else ():
            if len(piece) >= MIN_FRAGMENT:
                register_secret(piece)


def _mask_ambiguous(match: re.Match[str]) -> str:
    rest = match.group("rest")
    info = _userinfo_of(rest)
    if info is None or "@" not in info:
        return match.group(0)
    return f"{match.group('scheme')}{MASK}{rest[len(info) :]}"


def redact(text: str) -> str:
    """Return `text` with every registered secret replaced by `***`, and the user part of any URL
    holding several `@` masked whole."""
    if "://" in text and "@" in text:
        text = _URL.sub(_mask_ambiguous, text)
    for form in _variants:
        if form in text:
            text = text.replace(form, MASK)
    return text
