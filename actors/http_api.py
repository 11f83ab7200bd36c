"""The HTTP API of recorded sagas, served by Ray Serve on the cluster (the platform's routes).

=======  ================================  =========================================
method   path                              answer
=======  ================================  =========================================
POST     /essential/sagas/start            ``{"data": saga}`` (201; 200 for a repeated id/key)
POST     /essential/sagas/add              ``{"data": stage}`` (201)
GET      /essential/sagas/{id}/abort       ``{"data": saga}`` once compensated (``?reason=``)
GET      /essential/sagas/{id}/commit      ``{"data": saga}``
POST     /essential/sagas/{id}/signal      ``{"data": saga, "delivered": bool}`` (body ``{"name", "payload", "key"}``)
GET      /essential/sagas/{id}             ``{"data": saga}``
GET      /essential/sagas                  ``{"items": [saga, ...]}``
GET      /essential/sagas/count            ``{"total": n}``
GET      /essential/saga-stages            ``{"items": [stage, ...]}``
POST     /essential/sagas/{id}/signal      ``{"data": saga, "delivered": bool}`` (any saga; issue 9)
GET      /essential/health                 ``{"ok": true}`` (no token needed)
=======  ================================  =========================================

Filters arrive the way the platform's clients send them - nested query
parameters (``query[state]=running``, ``query[createdAt][$gte]=2025-01-01``) -
or plain (``state=running``, ``since=...``).  Every request but ``health``
needs ``Authorization: Bearer <token>`` (401 otherwise).  Errors are
``{"statusCode", "error", "type", "message", "fields": [{"field", "reason"}]}``:
400 for a malformed request (the message names the field), 404 for an unknown
saga, 409 for a transition the saga's state forbids, 413 for a body over
``ESSENTIAL_HTTP_MAX_BODY_BYTES``, 503 when Essential cannot answer now.
Bodies may use MongoDB Extended JSON (``{"$oid": ...}``) so recorded documents
keep their BSON types.  The replicas reach the supervisor through a Ray handle.
"""
# no ``from __future__ import annotations``: Serve pickles the routes, and FastAPI must see real types
import asyncio
import hmac
import logging
import os
import re
import secrets
from datetime import datetime, timezone
from http import HTTPStatus
from pathlib import Path
from typing import Any

from bson import json_util
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from ray import serve

from orchestration.recorded import InvalidField
from orchestration.states import SagaState

from .settings import Settings

log = logging.getLogger("essential.http")

API = FastAPI(title="Essential recorded sagas", docs_url=None, redoc_url=None, openapi_url=None)
_EJSON = json_util.RELAXED_JSON_OPTIONS.with_options(tz_aware=True, tzinfo=timezone.utc)
STATUS = {
    "SagaNotFound": 404, "IllegalTransition": 409, "InvalidField": 400, "InvalidRequest": 400,
    "InvalidPayload": 400, "UnknownJob": 400, "TooManyOpenSagas": 503,
}  # fmt: skip
MAX_LIMIT = 1000
_KEY = re.compile(r"^([^\[\]]+)((?:\[[^\[\]]*\])*)$")


class HttpError(Exception):
    def __init__(self, status: int, type_: str, message: str, fields: list[dict[str, str]] | None = None,
                 headers: dict[str, str] | None = None) -> None:  # fmt: skip
        self.status, self.type, self.message, self.fields, self.headers = status, type_, message, fields, headers
        super().__init__(message)


def bad(field: str, reason: str) -> HttpError:
    return HttpError(400, "InvalidField", f"{field}: {reason}", [{"field": field, "reason": reason}])


def error_response(exc: HttpError) -> JSONResponse:
    body: dict[str, Any] = {
        "statusCode": exc.status, "error": HTTPStatus(exc.status).phrase, "type": exc.type, "message": exc.message,
    }  # fmt: skip
    if exc.fields:
        body["fields"] = exc.fields
    return JSONResponse(body, status_code=exc.status, headers=exc.headers)


# -- query strings as the platform's clients send them ----------------------------------------------
def nested_query(items: list[tuple[str, str]]) -> dict[str, Any]:
    """``query[createdAt][$gte]=x&state=y`` → ``{"query": {"createdAt": {"$gte": "x"}}, "state": "y"}``.

    ``key[]=a&key[]=b`` and a repeated key make a list.
    """
    out: dict[str, Any] = {}
    for raw, value in items:
        match = _KEY.match(raw)
        if not match:
            raise bad(raw, "malformed parameter name")
        path = [match.group(1), *re.findall(r"\[([^\[\]]*)\]", match.group(2))]
        append = len(path) > 1 and path[-1] == ""
        if append:
            path.pop()
        node = out
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise bad(raw, "given both as a value and as an object")
            node = child
        key = path[-1]
        if append or key in node:
            current = node.get(key)
            if isinstance(current, dict):
                raise bad(raw, "given both as a value and as an object")
            node[key] = (current if isinstance(current, list) else ([] if current is None else [current])) + [value]
        else:
            node[key] = value
    return out


def _flatten(params: dict[str, Any]) -> dict[str, Any]:
    """Merge ``query[...]`` into the plain parameters (both forms are accepted)."""
    flat = {k: v for k, v in params.items() if k not in ("query", "filter")}
    for wrapper in ("query", "filter"):
        inner = params.get(wrapper)
        if isinstance(inner, dict):
            flat.update(inner)
        elif inner is not None:
            raise bad(wrapper, "expected query[<field>]=<value>")
    return flat


def _when(field: str, value: Any) -> datetime:
    if isinstance(value, str) and re.fullmatch(r"-?\d+(\.\d+)?", value.strip()):
        return datetime.fromtimestamp(float(value) / 1000, tz=timezone.utc)  # epoch milliseconds
    try:
        parsed = datetime.fromisoformat(str(value).strip().replace("Z", "+00:00"))
    except ValueError:
        raise bad(field, f"not a date: {value!r} (ISO 8601 or epoch milliseconds)") from None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=timezone.utc)


_RANGE = {"$gte": "$gte", "gte": "$gte", "from": "$gte", "$gt": "$gt", "gt": "$gt",
          "$lte": "$lte", "lte": "$lte", "to": "$lte", "$lt": "$lt", "lt": "$lt"}  # fmt: skip


def _range(field: str, value: Any) -> dict[str, datetime]:
    if not isinstance(value, dict):
        return {"$gte": _when(field, value)}
    out = {}
    for op, bound in value.items():
        if op not in _RANGE:
            raise bad(f"{field}.{op}", "use $gte, $gt, $lte or $lt")
        out[_RANGE[op]] = _when(f"{field}.{op}", bound)
    return out


def _int(field: str, value: Any, default: int, low: int, high: int) -> int:
    if value is None:
        return default
    try:
        number = int(str(value))
    except ValueError:
        raise bad(field, f"not a whole number: {value!r}") from None
    if not low <= number <= high:
        raise bad(field, f"must be between {low} and {high}")
    return number


def _text(field: str, value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise bad(field, "expected one non-empty value")
    return value


def paging(params: dict[str, Any], default_limit: int) -> tuple[int, int]:
    limit = _int("limit", params.pop("limit", None), default_limit, 1, MAX_LIMIT)
    skip = _int("skip", params.pop("skip", params.pop("offset", None)), 0, 0, 10**9)
    return limit, skip


def saga_filters(params: dict[str, Any]) -> dict[str, Any]:
    """Listing filters: state, job, kind, correlation_id, createdAt/updatedAt ranges (or since/until)."""
    filters: dict[str, Any] = {}
    known = {s.value for s in SagaState}
    for name, value in params.items():
        if name == "state":
            if isinstance(value, dict):
                value = value.get("$in", value.get("in"))
            states = value if isinstance(value, list) else str(value).split(",")
            states = [s.strip() for s in states if s and s.strip()]
            for s in states:
                if s not in known:
                    raise bad("state", f"unknown state {s!r}; use one of: {', '.join(sorted(known))}")
            filters["state"] = states
        elif name in ("job", "correlation_id", "kind"):
            filters[name] = _text(name, value)
            if name == "kind" and value not in ("recorded", "orchestrated"):
                raise bad("kind", "recorded or orchestrated")
        elif name in ("createdAt", "updatedAt"):
            filters[name] = {**filters.get(name, {}), **_range(name, value)}
        elif name in ("since", "from", "until", "to"):
            op = "$gte" if name in ("since", "from") else "$lte"
            filters["createdAt"] = {**filters.get("createdAt", {}), op: _when(name, value)}
        else:
            raise bad(name, "unknown filter; use state, job, kind, correlation_id, createdAt, updatedAt, since, until")
    return filters


def stage_filters(params: dict[str, Any]) -> dict[str, Any]:
    filters: dict[str, Any] = {}
    for name, value in params.items():
        if name in ("saga", "bucket", "action", "status"):
            filters[name] = _text(name, value)
        else:
            raise bad(name, "unknown filter; use saga, bucket, action, status")
    if "saga" in filters and not re.fullmatch(r"[0-9a-f]{24}", filters["saga"]):
        raise bad("saga", "not a saga id (24 hex digits)")
    return filters


def parse_body(raw: bytes) -> dict[str, Any]:
    """A JSON object (MongoDB Extended JSON accepted), or a 400 naming the body."""
    try:
        data = json_util.loads(raw, json_options=_EJSON)
    except Exception as exc:  # noqa: BLE001 - JSON, Extended JSON and encoding errors alike
        raise bad("<body>", f"not valid JSON: {str(exc).splitlines()[0][:200]}") from None
    if not isinstance(data, dict):
        raise bad("<body>", f"expected a JSON object, got {type(data).__name__}")
    return data


# -- the token -----------------------------------------------------------------------------------------
def ensure_token(settings: Settings) -> str:
    """ESSENTIAL_HTTP_TOKEN, else ``<home>/http_token`` (generated once, mode 0600)."""
    if settings.http_token:
        return settings.http_token
    path = Path(settings.home) / "http_token"
    if path.exists():
        return path.read_text().strip()
    path.parent.mkdir(parents=True, exist_ok=True)
    token = secrets.token_urlsafe(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
    return token


# -- the deployment ------------------------------------------------------------------------------------
def _doc(saga: dict[str, Any]) -> dict[str, Any]:
    return {"_id": saga["id"], **saga}


@serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=512)
@serve.ingress(API)
class HttpApi:
    def __init__(self, settings: dict[str, Any]) -> None:
        from .runtime import settings_from

        self.settings = settings_from(settings)
        if not self.settings.http_token:
            raise ValueError("the HTTP API needs a token (ESSENTIAL_HTTP_TOKEN)")
        self._token = self.settings.http_token.encode()
        self._supervisor: Any = None

    def __repr__(self) -> str:
        return f"HttpApi({self.settings.namespace})"

    # -- plumbing ----------------------------------------------------------------------------------
    async def supervisor(self) -> Any:
        if self._supervisor is None:
            from .client import get_supervisor

            self._supervisor = await asyncio.to_thread(get_supervisor, self.settings)
        return self._supervisor

    def _authorize(self, request: Request) -> None:
        header = request.headers.get("authorization", "")
        scheme, _, given = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), self._token):
            raise HttpError(401, "Unauthorized", "a valid bearer token is required (Authorization: Bearer <token>)",
                            headers={"WWW-Authenticate": 'Bearer realm="essential"'})  # fmt: skip

    async def _body(self, request: Request) -> dict[str, Any]:
        limit = self.settings.http_max_body_bytes
        too_large = HttpError(413, "PayloadTooLarge", f"the request body exceeds {limit} bytes")
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise too_large
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise too_large
            chunks.append(chunk)
        raw = b"".join(chunks)
        if not raw.strip():
            raise bad("<body>", "a JSON object is required")
        return parse_body(raw)

    async def _call(self, op: str, *args: Any, method: str = "recorded") -> dict[str, Any]:
        """``supervisor.recorded(op, *args)`` (or another supervisor ``method``), errors as HttpError."""
        try:
            supervisor = await self.supervisor()
            if method == "recorded":
                reply = await supervisor.recorded.remote(op, *args)
            else:
                reply = await getattr(supervisor, method).remote(*args)
        except Exception as exc:  # noqa: BLE001 - Ray unavailable, the supervisor restarting
            log.warning("supervisor call %s failed: %s", op, exc)
            self._supervisor = None
            raise HttpError(503, "Unavailable", "Essential's supervisor is not reachable right now; retry shortly",
                            headers={"Retry-After": "1"}) from None  # fmt: skip
        error = reply.get("error")
        if error:
            fields = error.get("fields")
            status = STATUS.get(error["type"], 503)
            raise HttpError(status, error["type"], error["message"], fields,
                            headers={"Retry-After": "1"} if status == 503 else None)  # fmt: skip
        return reply

    async def _serve(self, request: Request, work: Any) -> JSONResponse:
        try:
            if request.url.path.rstrip("/") != "/essential/health":
                self._authorize(request)
            status, body = await work()
            return JSONResponse(body, status_code=status)
        except HttpError as exc:
            return error_response(exc)
        except InvalidField as exc:
            return error_response(HttpError(400, "InvalidField", str(exc), [{"field": f, "reason": r} for f, r in exc.fields]))

    def _params(self, request: Request) -> dict[str, Any]:
        return _flatten(nested_query(list(request.query_params.multi_items())))

    # -- routes ------------------------------------------------------------------------------------
    @API.get("/essential/health")
    async def health(self, request: Request) -> JSONResponse:
        async def work() -> tuple[int, Any]:
            return 200, {"ok": True}

        return await self._serve(request, work)

    @API.post("/essential/sagas/start")
    async def start(self, request: Request) -> JSONResponse:
        async def work() -> tuple[int, Any]:
            body = await self._body(request)
            reply = await self._call("start", body)
            return (201 if reply.get("created") else 200), {"data": _doc(reply["saga"])}

        return await self._serve(request, work)

    @API.post("/essential/sagas/add")
    async def add(self, request: Request) -> JSONResponse:
        async def work() -> tuple[int, Any]:
            body = await self._body(request)
            if not body.get("saga"):
                raise bad("saga", "which saga the stage belongs to (its id) is required")
            reply = await self._call("add", None, body)
            return 201, {"data": reply["stage"]}

        return await self._serve(request, work)

    @API.post("/essential/sagas/{saga_id}/signal")
    async def signal(self, saga_id: str, request: Request) -> JSONResponse:
        """Issue 9: deliver a signal (``{"name", "payload", "key"}``) to any saga; stored durably first."""

        async def work() -> tuple[int, Any]:
            body = await self._body(request)
            unknown = sorted(set(body) - {"name", "payload", "key"})
            if unknown:
                raise bad(unknown[0], "unknown field; a signal has name, payload and key")
            reply = await self._call(None, saga_id, body.get("name"), body.get("payload"), body.get("key"), method="signal")
            return 200, {"data": _doc(reply["saga"]), "delivered": reply.get("delivered")}

        return await self._serve(request, work)

    @API.get("/essential/sagas/count")
    async def count(self, request: Request) -> JSONResponse:
        async def work() -> tuple[int, Any]:
            filters = saga_filters(self._params(request))
            return 200, {"total": (await self._call("count", filters))["total"]}

        return await self._serve(request, work)

    @API.get("/essential/sagas/{saga_id}/abort")
    async def abort(self, saga_id: str, request: Request) -> JSONResponse:
        async def work() -> tuple[int, Any]:
            reason = request.query_params.get("reason") or "aborted over HTTP"
            reply = await self._call("abort", saga_id, reason[:500], None)
            return 200, {"data": _doc(reply["saga"])}

        return await self._serve(request, work)

    @API.get("/essential/sagas/{saga_id}/commit")
    async def commit(self, saga_id: str, request: Request) -> JSONResponse:
        async def work() -> tuple[int, Any]:
            return 200, {"data": _doc((await self._call("commit", saga_id))["saga"])}

        return await self._serve(request, work)

    @API.post("/essential/sagas/{saga_id}/signal")
    async def signal(self, saga_id: str, request: Request) -> JSONResponse:
        """Issue 9: deliver a signal (an approval, a callback) to an orchestrated saga; stored durably first."""

        async def work() -> tuple[int, Any]:
            body = await self._body(request)
            if not isinstance(body.get("name"), str) or not body["name"]:
                raise bad("name", "the signal's name is required, e.g. identity.verified")
            try:
                supervisor = await self.supervisor()
                reply = await supervisor.signal.remote(saga_id, body["name"], body.get("payload"), body.get("key"))
            except Exception as exc:  # noqa: BLE001 - Ray unavailable, the supervisor restarting
                log.warning("supervisor call signal failed: %s", exc)
                self._supervisor = None
                raise HttpError(503, "Unavailable", "Essential's supervisor is not reachable right now; retry shortly",
                                headers={"Retry-After": "1"}) from None  # fmt: skip
            error = reply.get("error")
            if error:
                raise HttpError(STATUS.get(error["type"], 503), error["type"], error["message"])
            return 200, {"data": _doc(reply["saga"]), "delivered": reply["delivered"]}

        return await self._serve(request, work)

    @API.get("/essential/sagas/{saga_id}")
    async def get(self, saga_id: str, request: Request) -> JSONResponse:
        async def work() -> tuple[int, Any]:
            return 200, {"data": _doc((await self._call("get", saga_id))["saga"])}

        return await self._serve(request, work)

    @API.get("/essential/sagas")
    async def list_sagas(self, request: Request) -> JSONResponse:
        async def work() -> tuple[int, Any]:
            params = self._params(request)
            limit, skip = paging(params, 50)
            reply = await self._call("list", saga_filters(params), limit, skip)
            return 200, {"items": [_doc(s) for s in reply["sagas"]]}

        return await self._serve(request, work)

    @API.get("/essential/saga-stages")
    async def stages(self, request: Request) -> JSONResponse:
        async def work() -> tuple[int, Any]:
            params = self._params(request)
            limit, skip = paging(params, 200)
            reply = await self._call("stage_list", stage_filters(params), limit, skip)
            return 200, {"items": reply["stages"]}

        return await self._serve(request, work)


def app_name(settings: Settings) -> str:
    return f"{settings.namespace}-http"


def start_http(settings: Settings, *, token: str | None = None) -> str:
    """Start Ray Serve (bound to ``http_host``) and deploy the API; returns its base address.

    Call from a driver connected to the cluster.  Idempotent: a second call redeploys the app.
    """
    token = token or ensure_token(settings)
    serve.start(http_options={"host": settings.http_host, "port": settings.http_port})
    conf = settings.model_copy(update={"http_token": token}).model_dump(mode="json")
    app = HttpApi.options(num_replicas=settings.http_replicas).bind(conf)
    serve.run(app, name=app_name(settings), route_prefix=settings.http_route_prefix, blocking=False)
    host, port = settings.http_host, settings.http_port
    try:  # Serve may have been running already, on its own address
        from ray.serve.context import _get_global_client

        config = _get_global_client().http_config
        host, port = config.host, config.port
    except Exception:  # noqa: BLE001 - fall back to what was asked for
        pass
    return f"http://{host}:{port}{settings.http_route_prefix.rstrip('/')}/essential"


def stop_http(settings: Settings) -> None:
    """Remove the API's application (Serve itself stays)."""
    serve.delete(app_name(settings))
