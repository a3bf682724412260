"""`redact.register_url` registers a URL's password in every form it can take in our output.

The registry is process-wide: each test uses a password no other test's text holds."""

from __future__ import annotations

from urllib.parse import quote, quote_plus

from reconciler.redact import MASK, redact, register_url


def test_a_raw_password_is_masked() -> None:
    url = "postgresql://app:Rw8kXq2vZt@db.example:5432/app"
    register_url(url)
    shown = redact(f"cannot connect to {url}: password Rw8kXq2vZt refused")
    assert "Rw8kXq2vZt" not in shown
    assert shown == f"cannot connect to postgresql://app:{MASK}@db.example:5432/app: password {MASK} refused"


def test_a_url_encoded_password_is_masked_decoded_and_encoded() -> None:
    password = "Ue5/jk:Hq#9 w"
    url = f"postgresql://app:{quote(password, safe='')}@db.example/app"
    register_url(url)
    for form in (password, quote(password, safe=""), quote_plus(password), quote(password)):
        shown = redact(f"the password was {form!s} here")
        assert shown == f"the password was {MASK} here", (form, shown)
    assert redact(url) == f"postgresql://app:{MASK}@db.example/app"


def test_a_percent_escaped_password_is_masked_as_configparser_holds_it() -> None:
    password = "Pe%7Yz%Lm4"
    url = f"mysql+pymysql://app:{quote(password, safe='')}@db.example/app"
    register_url(url)
    escaped = url.replace("%", "%%")  # Alembic's Config interpolation doubles every `%`
    shown = redact(f"sqlalchemy.url = {escaped}")
    assert "7Yz" not in shown and "Lm4" not in shown, shown
    assert (
        redact(f"raw {password} and escaped {password.replace('%', '%%')}")
        == f"raw {MASK} and escaped {MASK}"
    )


def test_an_unescaped_at_in_the_password_is_masked_whole() -> None:
    url = "postgresql://owner:Ka3@Wtyu@Bnmq@db.example:5432/app"
    register_url(url)
    assert redact(url) == f"postgresql://{MASK}@db.example:5432/app"
    for text in (
        "login owner:Ka3@Wtyu@Bnmq failed",  # the user part between :// and the last @
        "password Ka3@Wtyu@Bnmq refused",  # the password as written
        "unknown host Wtyu@Bnmq@db.example",  # a parser that split at the first @
        "port Bnmq@db.example is not a number",
    ):
        shown = redact(text)
        assert "Wtyu" not in shown and "Bnmq" not in shown and "Ka3@" not in shown, shown


def test_a_url_without_a_password_registers_nothing() -> None:
    register_url("sqlite:////srv/Nopw9@x/app.db")
    register_url("postgresql://Nouser7q@db.example/app")
    register_url(None)
    text = "sqlite:////srv/Nopw9@x/app.db and postgresql://Nouser7q@db.example/app"
    assert redact(text) == text
