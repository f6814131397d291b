"""Progress bars that can be switched off: a ``tqdm.auto`` bar when enabled, a silent stand-in otherwise.

tqdm is imported only when a bar is shown, so switched-off bars cost nothing at import time.
"""

from __future__ import annotations

from typing import Any, Protocol

__all__ = ["ProgressBar", "NoBar", "progress_bar"]


class ProgressBar(Protocol):
    """What callers use of a bar: ``update(n)`` after ``n`` steps, ``close()`` at the end."""

    def update(self, n: int = 1) -> Any: ...

    def close(self) -> Any: ...


class NoBar:
    """A bar that shows nothing: ``update`` and ``close`` do nothing."""

    def update(self, n: int = 1) -> None:
        """Ignore ``n`` steps."""
        return None

    def close(self) -> None:
        """Nothing to close."""
        return None


def progress_bar(total: int, desc: str, enabled: bool, **tqdm_kwargs: Any) -> ProgressBar:
    """A ``tqdm.auto`` bar of ``total`` steps labelled ``desc`` when ``enabled``, else a :class:`NoBar`.

    Extra keyword arguments go to tqdm (ignored when the bar is off).
    """
    if not enabled:
        return NoBar()
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, **tqdm_kwargs)
