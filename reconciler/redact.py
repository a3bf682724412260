"""Keep database passwords (and other registered secrets) out of every output.

A secret is registered once, when the configuration is resolved; `redact()` then replaces it in any
text in every encoding it could take there: raw, URL-encoded (both `quote` and `quote_plus`), and
the doubled-percent form used for Alembic's configparser.
"""

from __future__ import annotations

import threading
from urllib.parse import quote, quote_plus

MASK = "***"
_lock = threading.Lock()
_variants: list[str] = []


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


def redact(text: str) -> str:
    """Return `text` with every registered secret replaced by `***`."""
    for form in _variants:
        if form in text:
            text = text.replace(form, MASK)
    return text
