"""The HTTP API's error envelope.

Why one place: every refusal a client can cause must come back as a 4xx in the
same JSON shape - ``{"statusCode", "error", "type", "message", "fields": [{"field",
"reason"}]}`` - whether Essential's own code refused it, FastAPI's router (unknown
route, wrong method) or a typed error from the supervisor.  Which status a typed
error gets is the error contract's (:mod:`essential.actors.errors`); besides it,
401 ``Unauthorized`` (no valid bearer token), 404 ``NotFound`` (no such route),
405 ``MethodNotAllowed``, 413 ``PayloadTooLarge`` and 503 ``Unavailable`` (with
``Retry-After``) are the API's own.
"""
from __future__ import annotations

import logging
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from essential.actors.errors import http_status
from essential.orchestration.errors import field_problems

log = logging.getLogger("essential.http")

RETRY_AFTER = {"Retry-After": "1"}


class HttpError(Exception):
    def __init__(self, status: int, type_: str, message: str, fields: list[dict[str, str]] | None = None,
                 headers: dict[str, str] | None = None) -> None:  # fmt: skip
        self.status, self.type, self.message, self.fields = status, type_, message, fields or []
        self.headers = headers
        super().__init__(message)


def bad(field: str, reason: str) -> HttpError:
    """400 naming the field."""
    return HttpError(400, "InvalidField", f"{field}: {reason}", [{"field": field, "reason": reason}])


def from_reply(error: dict[str, Any]) -> HttpError:
    """A typed error from a supervisor reply (``{"type", "message", "fields"?}``) with its status."""
    status = http_status(error["type"])
    return HttpError(status, error["type"], error["message"], error.get("fields"),
                     headers=RETRY_AFTER if status == 503 else None)  # fmt: skip


def unavailable(message: str) -> HttpError:
    return HttpError(503, "Unavailable", message, headers=RETRY_AFTER)


def internal(message: str) -> HttpError:
    return HttpError(500, "InternalError", message)


def error_response(exc: HttpError) -> JSONResponse:
    body: dict[str, Any] = {
        "statusCode": exc.status, "error": HTTPStatus(exc.status).phrase, "type": exc.type, "message": exc.message,
        "fields": exc.fields,
    }  # fmt: skip
    return JSONResponse(body, status_code=exc.status, headers=exc.headers)


def install(app: FastAPI) -> None:
    """Answer FastAPI's own refusals (unknown route, wrong method, anything unexpected) in the envelope."""

    @app.exception_handler(StarletteHTTPException)
    async def _routing(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        where = f"{request.method} {request.url.path}"
        if exc.status_code == 404:
            return error_response(HttpError(404, "NotFound", f"no route {where}; the API's routes are under /essential/"))
        if exc.status_code == 405:
            allow = (exc.headers or {}).get("Allow", "")
            return error_response(HttpError(405, "MethodNotAllowed", f"{where} is not allowed; this route takes {allow}",
                                            headers=exc.headers))  # fmt: skip
        return error_response(HttpError(exc.status_code, HTTPStatus(exc.status_code).phrase.replace(" ", ""),
                                        str(exc.detail), headers=exc.headers))  # fmt: skip

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        fields = [{"field": f, "reason": r} for f, r in field_problems(exc, "")]
        return error_response(HttpError(400, "InvalidField", "; ".join(f"{f['field']}: {f['reason']}" for f in fields),
                                        fields))  # fmt: skip

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("HTTP %s %s failed", request.method, request.url.path)
        return error_response(internal(f"Essential failed on this request ({type(exc).__name__}); it is logged"))
