"""Server URLs: checked before anything is sent, and never printed with a key in them."""

from __future__ import annotations

from collections.abc import Iterable
from urllib.parse import urlsplit

from ..errors import BackendError


def redact(url: str) -> str:
    """``url`` with any user-info (``user:key@``) replaced by ``***@``: a key is never printed."""
    scheme, sep, rest = url.partition("://")
    netloc, slash, path = rest.partition("/")
    if not sep or "@" not in netloc:
        return url
    return f"{scheme}://***@{netloc.rpartition('@')[2]}{slash}{path}"


def no_credentials(url: str) -> None:
    """A URL with user-info (``http://user:key@host``) is a ``BackendError`` that names no key."""
    if "@" in urlsplit(url).netloc:
        raise BackendError(f"--base-url {redact(url)}: credentials in the URL: use --api-key (or OPENAI_API_KEY)")


def check_url(url: str) -> None:
    """``url`` is an http(s) URL with a host and a valid port, and no credentials in it
    (``BackendError`` if not; the message never holds the key)."""
    no_credentials(url)
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise BackendError(f"--base-url {url!r} is not an http(s) URL (e.g. http://localhost:8000/v1)")
    try:
        parts.port  # noqa: B018 - raises on a bad port
    except ValueError:
        raise BackendError(f"--base-url {url!r}: bad port") from None


def split_urls(value: str | Iterable[str] | None) -> list[str]:
    """Server URLs from a flag, variable or config value: one string, a comma-separated string,
    or a list of them; blanks and repeats dropped, order kept, a trailing ``/`` stripped."""
    if value is None:
        return []
    parts = [value] if isinstance(value, str) else list(value)
    urls = [u.strip().rstrip("/") for p in parts for u in str(p).split(",")]
    return list(dict.fromkeys(u for u in urls if u))
