"""Key and URL spelling of the Redis page store, without torch: the store itself and `kvrelay store
stats` (which only scans keys) both read it, and the command line loads it when it builds."""

from __future__ import annotations

from urllib.parse import quote, urlsplit, urlunsplit


def esc(s: str) -> str:
    """A name as it appears inside a key (producer ids hold ':' and '|')."""
    return quote(s, safe="")


def redact(url: str) -> str:
    """The URL without its password, for messages and metrics."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = f"{parts.username or ''}:***@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))
