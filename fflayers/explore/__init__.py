"""The explorer: ``fflayers explore``, a local web page to trace a prompt through the layers, read and switch
FFN memories, and search them (docs/explorer.md has the page and its JSON API).

>>> from fflayers.cli.explore import build_explorer
>>> from fflayers.explore import serve
>>> serve(build_explorer(adapter, memories="top50_textual", values="values.parquet"))  # http://127.0.0.1:8765/

:class:`Explorer` answers every request without the web (for scripts and tests); :func:`create_app` is the
Starlette app; :func:`serve` / :func:`serve_in_thread` run it with uvicorn. The explorer reads the other
analyses' outputs through the objects it is given (``build_explorer`` makes them from paths), so it imports
none of them.
"""

from fflayers.explore.interventions import Intervention, RequestError, applied, parse_interventions
from fflayers.explore.notes import Notes
from fflayers.explore.session import Explorer, Limits

__all__ = ["Explorer", "Intervention", "Limits", "Notes", "RequestError", "applied", "create_app",
           "parse_interventions", "serve", "serve_in_thread"]


def __getattr__(name: str):
    # the web pieces import starlette / uvicorn only when used
    if name == "create_app":
        from fflayers.explore.app import create_app

        return create_app
    if name in ("serve", "serve_in_thread"):
        from fflayers.explore import server

        return getattr(server, name)
    raise AttributeError(name)
