"""The explorer's web app (Starlette): the static page and the JSON API of ``docs/explorer.md``.

Every response carries the model's fingerprint; bad input is a 4xx JSON ``{"error": one line}``. Model work
runs in the thread pool, one request at a time on the model (:attr:`Explorer.lock`). With a ``token``, every
request but the static files must carry it: the page as ``/?token=``, the API as ``Authorization: Bearer``
(or ``?access_token=``).
"""

from __future__ import annotations

import hmac
import json
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Route

from fflayers.core import FflayersError
from fflayers.explore.interventions import RequestError
from fflayers.explore.session import Explorer

__all__ = ["STATIC", "create_app", "plotly_js"]

#: the page's own files (package data)
STATIC = Path(__file__).with_name("static")
#: the largest request body accepted, in bytes
MAX_BODY = 256 * 1024


def plotly_js() -> Path:
    """plotly.min.js as shipped in the plotly wheel (offline)."""
    path = Path(str(resources.files("plotly") / "package_data" / "plotly.min.js"))
    if not path.is_file():
        raise FileNotFoundError("plotly.min.js is missing from the plotly package; reinstall plotly")
    return path


def _error(message: str, status: int, fingerprint: str) -> JSONResponse:
    return JSONResponse({"error": " ".join(str(message).split()), "fingerprint": fingerprint},
                        status_code=status)


async def _body(request: Request) -> dict:
    raw = await request.body()
    if len(raw) > MAX_BODY:
        raise RequestError(f"the request body is {len(raw)} bytes; at most {MAX_BODY}", 413)
    if not raw:
        return {}
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as err:
        raise RequestError(f"the request body is not JSON ({err}); send a JSON object", 400) from None
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object", 400)
    return body


def _query_int(request: Request, name: str, default: int | None = None) -> int:
    raw = request.query_params.get(name)
    if raw is None:
        if default is None:
            raise RequestError(f"query parameter {name!r} is missing", 400)
        return default
    try:
        return int(raw)
    except ValueError:
        raise RequestError(f"query parameter {name!r} must be an integer, got {raw!r}", 400) from None


def _fields(body: dict, allowed: dict[str, Any]) -> dict[str, Any]:
    """The body's fields, defaults filled in; an unknown field is an error (a typo would pass silently)."""
    unknown = sorted(set(body) - set(allowed))
    if unknown:
        raise RequestError(f"unknown field {unknown[0]!r}; this request takes {', '.join(allowed)}", 400)
    return {name: body.get(name, default) for name, default in allowed.items()}


def create_app(explorer: Explorer, token: str | None = None) -> Starlette:
    """The ASGI app serving ``explorer``; ``token`` (when given) is required by the page and the API."""
    fp = explorer.fingerprint

    def answer(payload: dict) -> JSONResponse:
        return JSONResponse({**payload, "fingerprint": fp})

    def endpoint(fn: Callable[[Request], Any]):
        async def handle(request: Request) -> Response:
            if token is not None:
                # the page is opened as /?token=...; API calls send the header (or ?access_token=)
                name = "token" if request.url.path == "/" else "access_token"
                given = request.query_params.get(name) or ""
                auth = request.headers.get("authorization", "")
                if auth.lower().startswith("bearer "):
                    given = auth[7:].strip()
                if not hmac.compare_digest(given.encode(), token.encode()):
                    return _error("missing or wrong access token; open the URL the server printed (it ends "
                                  "in "
                                  "?token=...)", 401, fp)
            try:
                return await fn(request)
            except RequestError as err:
                return _error(str(err), err.status, fp)
            except FflayersError as err:
                return _error(str(err), 422, fp)

        return handle

    async def page(request: Request) -> Response:
        return FileResponse(STATIC / "index.html", media_type="text/html")

    async def info(request: Request) -> Response:
        return answer(explorer.info())

    def post(method: Callable[..., dict], allowed: dict[str, Any]):
        async def handle(request: Request) -> Response:
            kwargs = _fields(await _body(request), allowed)
            return answer(await run_in_threadpool(method, **kwargs))

        return handle

    trace = post(explorer.trace, {"prompt": None, "position": -1, "lens": "logit", "k": 10, "target": None,
                                  "interventions": None})
    subupdates = post(explorer.subupdates, {"prompt": None, "layer": None, "position": -1, "target": None,
                                            "n": 20, "k": 8, "interventions": None})
    generate = post(explorer.generate, {"prompt": None, "max_new_tokens": 10, "interventions": None})
    export = post(explorer.export, {"prompt": None, "interventions": None})
    note = post(explorer.save_note, {"layer": None, "dim": None, "name": "", "note": ""})

    async def value(request: Request) -> Response:
        args = (_query_int(request, "layer"), _query_int(request, "dim"), _query_int(request, "k", 10))
        return answer(await run_in_threadpool(explorer.value, *args))

    async def search(request: Request) -> Response:
        tok = request.query_params.get("token")
        if tok is None:
            raise RequestError("query parameter 'token' is missing: the token searched for", 400)
        return answer(await run_in_threadpool(explorer.search, tok, _query_int(request, "limit", 50)))

    async def search_keys(request: Request) -> Response:
        text = request.query_params.get("text")
        return answer(await run_in_threadpool(explorer.search_keys, text, _query_int(request, "limit", 50)))

    async def notes_csv(request: Request) -> Response:
        if explorer.notes is None:
            raise RequestError("this server keeps no notes (started without a notes file)", 404)
        return Response(explorer.notes.to_csv(fp), media_type="text/csv",
                        headers={"Content-Disposition": "attachment; filename=explorer_notes.csv"})

    async def static(request: Request) -> Response:
        name = request.path_params["name"]
        if name == "plotly.min.js":
            return FileResponse(plotly_js(), media_type="text/javascript")
        path = STATIC / name
        if "/" in name or name.startswith(".") or not path.is_file():
            raise HTTPException(404)
        return FileResponse(path)

    async def not_found(request: Request, exc: HTTPException) -> Response:
        what = "unknown route" if exc.status_code == 404 else exc.detail
        return _error(f"{what}: {request.method} {request.url.path}; see docs/explorer.md for the API",
                      exc.status_code, fp)

    routes = [
        Route("/", endpoint(page)),
        Route("/api/info", endpoint(info)),
        Route("/api/trace", endpoint(trace), methods=["POST"]),
        Route("/api/subupdates", endpoint(subupdates), methods=["POST"]),
        Route("/api/generate", endpoint(generate), methods=["POST"]),
        Route("/api/export", endpoint(export), methods=["POST"]),
        Route("/api/note", endpoint(note), methods=["POST"]),
        Route("/api/notes.csv", endpoint(notes_csv)),
        Route("/api/value", endpoint(value)),
        Route("/api/search", endpoint(search)),
        Route("/api/search_keys", endpoint(search_keys)),
        Route("/static/{name}", static),
    ]
    return Starlette(routes=routes, exception_handlers={HTTPException: not_found})
