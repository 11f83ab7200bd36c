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
GET      /essential/sagas                  ``{"items": [saga, ...]}`` (+ ``"unreadable"`` when a stored one is corrupt)
GET      /essential/sagas/count            ``{"total": n}``
GET      /essential/saga-stages            ``{"items": [stage, ...]}``
GET      /essential/health                 ``{"ok": true}`` (no token needed)
=======  ================================  =========================================

Filters arrive the way the platform's clients send them - nested query
parameters (``query[state]=running``, ``query[createdAt][$gte]=2025-01-01``) -
or plain (``state=running``, ``since=...``); only the filters named here are
accepted, and a value is a value (``query[job][$ne]=x`` is refused, never passed on).
Every request but ``health`` needs ``Authorization: Bearer <token>`` (401
otherwise; a token anywhere else does not count).  Bodies are JSON objects
(``Content-Type: application/json``, UTF-8, no duplicate keys, no NaN) and may
use MongoDB Extended JSON (``{"$oid": ...}``) so recorded documents keep their
BSON types.  Every refusal is an envelope of :mod:`essential.actors.http.errors`, whose
table says which status means what.  The replicas reach the supervisor through
a Ray handle.
"""
# no ``from __future__ import annotations``: Serve pickles the routes, and FastAPI must see real types
import asyncio
import hmac
import json
import logging
import math
import os
import re
import secrets
from datetime import datetime, timedelta, timezone
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

import ray
from bson import json_util
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from ray import serve

from essential.actors.http import errors as http_errors
from essential.actors.http.errors import HttpError, bad, error_response, from_reply, internal, unavailable
from essential.actors.settings import Settings
from essential.orchestration.errors import InvalidField, field_problems
from essential.orchestration.signals import SignalRequest
from essential.orchestration.states import SagaState
from essential.orchestration.storable import MAX_DEPTH, depth_exceeds

log = logging.getLogger("essential.http")

API = FastAPI(title="Essential recorded sagas", docs_url=None, redoc_url=None, openapi_url=None)
http_errors.install(API)
_EJSON = json_util.RELAXED_JSON_OPTIONS.with_options(tz_aware=True, tzinfo=timezone.utc)
MAX_LIMIT = 1000
MAX_SKIP = 10**9
#: longest filter value (job, correlation id, bucket ...)
MAX_TEXT = 200
_KEY = re.compile(r"^([^\[\]]+)((?:\[[^\[\]]*\])*)$")
_SAGA_ID = re.compile(r"[0-9a-fA-F]{24}")
_WHOLE = re.compile(r"[+-]?[0-9]{1,20}")
_EPOCH_MS = re.compile(r"-?[0-9]+(\.[0-9]+)?")
_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
_FIRST = datetime(1, 1, 1, tzinfo=timezone.utc)
_LAST = datetime(9999, 12, 31, 23, 59, 59, 999000, tzinfo=timezone.utc)
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")


# -- query strings as the platform's clients send them ----------------------------------------------
def nested_query(items: list[tuple[str, str]]) -> dict[str, Any]:
    """``query[createdAt][$gte]=x&state=y`` → ``{"query": {"createdAt": {"$gte": "x"}}, "state": "y"}``.

    ``key[]=a&key[]=b`` and a repeated key make a list.
    """
    out: dict[str, Any] = {}
    for name, value in items:
        raw = name[:100]  # as the errors name it
        match = _KEY.match(name)
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
            for name in inner:
                if name in flat:
                    raise bad(name, f"given both as {wrapper}[{name}] and otherwise; give it once")
            flat.update(inner)
        elif inner is not None:
            raise bad(wrapper, "expected query[<field>]=<value>")
    return flat


def _one(field: str, value: Any) -> str:
    """The one text value of a parameter: a repeated one or an operator object is refused."""
    if isinstance(value, list):
        raise bad(field, "given more than once; give one value")
    if isinstance(value, dict):
        raise bad(field, "operators are not accepted here; give one value")
    return str(value)


def _when(field: str, value: Any) -> datetime:
    """ISO 8601 (UTC unless it says otherwise) or epoch milliseconds, within years 1 to 9999 UTC."""
    text = _one(field, value).strip()
    out_of_range = f"{text[:40]!r} is out of range (dates run from year 1 to 9999 UTC)"
    if _EPOCH_MS.fullmatch(text):  # epoch milliseconds
        try:
            ms = Decimal(text)
        except InvalidOperation:
            raise bad(field, f"not a date: {text[:40]!r}") from None
        if not (_FIRST - _EPOCH) / timedelta(milliseconds=1) <= ms <= (_LAST - _EPOCH) / timedelta(milliseconds=1):
            raise bad(field, out_of_range)
        return _EPOCH + timedelta(milliseconds=float(ms))
    try:
        parsed = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise bad(field, f"not a date: {text[:40]!r} (ISO 8601 or epoch milliseconds)") from None
    if parsed.tzinfo is None:
        return parsed.replace(tzinfo=timezone.utc)
    try:
        return parsed.astimezone(timezone.utc)
    except OverflowError:
        raise bad(field, out_of_range) from None


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
    """A whole number in ASCII digits (``int()`` alone would read ``"1_0"`` or Arabic-Indic digits)."""
    if value is None:
        return default
    text = _one(field, value).strip()
    if not _WHOLE.fullmatch(text):
        raise bad(field, f"not a whole number between {low} and {high}: {text[:40]!r}")
    number = int(text)
    if not low <= number <= high:
        raise bad(field, f"must be between {low} and {high}")
    return number


def _text(field: str, value: Any) -> str:
    text = _one(field, value)
    if not text:
        raise bad(field, "expected one non-empty value")
    if len(text) > MAX_TEXT or "\x00" in text:
        raise bad(field, f"at most {MAX_TEXT} characters, no NUL")
    return text


def paging(params: dict[str, Any], default_limit: int) -> tuple[int, int]:
    limit = _int("limit", params.pop("limit", None), default_limit, 1, MAX_LIMIT)
    skip = _int("skip", params.pop("skip", params.pop("offset", None)), 0, 0, MAX_SKIP)
    return limit, skip


def saga_filters(params: dict[str, Any]) -> dict[str, Any]:
    """Listing filters: state, job, kind, correlation_id, createdAt/updatedAt ranges (or since/until)."""
    filters: dict[str, Any] = {}
    known = {s.value for s in SagaState}
    for name, value in params.items():
        if name == "state":
            if isinstance(value, dict):
                other = sorted(set(value) - {"$in", "in"})
                if other:
                    raise bad(f"state.{other[0]}", "use state=<state>, state=<a>,<b> or state[$in][]=<state>")
                value = value.get("$in", value.get("in"))
            states = value if isinstance(value, list) else _one("state", value).split(",")
            states = [_one("state", s).strip() for s in states if s and _one("state", s).strip()]
            for s in states:
                if s not in known:
                    raise bad("state", f"unknown state {s[:40]!r}; use one of: {', '.join(sorted(known))}")
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
    if "saga" in filters:
        filters["saga"] = saga_id_of(filters["saga"], "saga")
    return filters


def saga_id_of(value: str, field: str = "id") -> str:
    """A saga id as stored (24 lower-case hex digits), or a 400 naming the field."""
    if not _SAGA_ID.fullmatch(value):
        raise bad(field, f"not a saga id (24 hex digits): {value[:40]!r}")
    return value.lower()


# -- bodies --------------------------------------------------------------------------------------------
class _Duplicate(ValueError):
    pass


def _pairs(pairs: list[tuple[str, Any]]) -> Any:
    """An object of the body: duplicate keys refused (parsers disagree on which one wins)."""
    seen = set()
    for key, _ in pairs:
        if key in seen:
            raise _Duplicate(key)
        seen.add(key)
    return json_util.object_pairs_hook(pairs, _EJSON)


def _constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _finite(text: str) -> float:
    number = float(text)
    if not math.isfinite(number):
        raise ValueError(f"{text[:40]} is not a finite number")
    return number


def _lone_surrogate(value: Any) -> str | None:
    """The path of a string (or key) that UTF-8 - and so BSON - cannot encode, else None (iterative)."""
    stack: list[tuple[Any, str]] = [(value, "")]
    while stack:
        item, path = stack.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                return path or "<body>"
        elif isinstance(item, dict):
            for key, child in item.items():
                stack.extend([(key, path or "<body>"), (child, f"{path}.{key}".lstrip("."))])
        elif isinstance(item, list):
            stack.extend((child, f"{path}.{i}".lstrip(".")) for i, child in enumerate(item))
    return None


def parse_body(raw: bytes) -> dict[str, Any]:
    """A JSON object (MongoDB Extended JSON accepted), or a 400 naming the body or the field."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise bad("<body>", f"not UTF-8: {exc.reason} at byte {exc.start}") from None
    try:
        data = json.loads(text, object_pairs_hook=_pairs, parse_constant=_constant, parse_float=_finite)
    except RecursionError:
        raise bad("<body>", f"nested deeper than {MAX_DEPTH} levels") from None
    except _Duplicate as exc:
        raise bad("<body>", f"the key {str(exc)[:80]!r} is given twice in one object") from None
    except Exception as exc:  # noqa: BLE001 - JSON and Extended JSON errors alike
        raise bad("<body>", f"not valid JSON: {str(exc).splitlines()[0][:200]}") from None
    if not isinstance(data, dict):
        raise bad("<body>", f"expected a JSON object, got {type(data).__name__}")
    if _SURROGATE_ESCAPE.search(raw):
        where = _lone_surrogate(data)
        if where is not None:
            raise bad("<body>", f"{where}: a lone UTF-16 surrogate (\\ud800-\\udfff) is not text")
    for key, value in data.items():
        if depth_exceeds(value, MAX_DEPTH):
            raise bad(key, f"nested deeper than {MAX_DEPTH} levels")
    return data


def check_content_type(value: str | None) -> None:
    """``application/json`` (or ``…+json``), UTF-8 if a charset is given; anything else is a 400."""
    media, _, rest = (value or "").partition(";")
    media = media.strip().lower()
    if media != "application/json" and not (media.startswith("application/") and media.endswith("+json")):
        raise bad("content-type", f"{media or 'none given'}: send the body as application/json")
    for param in rest.split(";"):
        name, _, charset = param.partition("=")
        if name.strip().lower() == "charset" and charset.strip().strip('"').lower() not in ("utf-8", "utf8"):
            raise bad("content-type", f"charset {charset.strip()[:40]}: JSON bodies are UTF-8")


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
        from essential.actors.settings import settings_from

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
            from essential.actors.client.ray_client import get_supervisor

            self._supervisor = await asyncio.to_thread(get_supervisor, self.settings)
        return self._supervisor

    def _authorize(self, request: Request) -> None:
        """The bearer token, from the Authorization header only (a URL ends up in logs and histories)."""
        header = request.headers.get("authorization", "")
        scheme, _, given = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode("utf-8", "replace"), self._token):
            reason = "a valid bearer token is required (Authorization: Bearer <token>)"
            raise HttpError(401, "Unauthorized", reason, [{"field": "Authorization", "reason": reason}],
                            headers={"WWW-Authenticate": 'Bearer realm="essential"'})  # fmt: skip

    async def _body(self, request: Request) -> dict[str, Any]:
        check_content_type(request.headers.get("content-type"))
        limit = self.settings.http_max_body_bytes
        reason = f"the request body exceeds {limit} bytes (ESSENTIAL_HTTP_MAX_BODY_BYTES)"
        too_large = HttpError(413, "PayloadTooLarge", reason, [{"field": "<body>", "reason": reason}])
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

    async def _call(self, op: Any, *args: Any, method: str = "recorded") -> dict[str, Any]:
        """``supervisor.recorded(op, *args)`` (or another supervisor ``method``), errors as HttpError.

        503 only when the supervisor cannot be reached; a failure inside it is Essential's own (500).
        """
        try:
            supervisor = await self.supervisor()
            remote = supervisor.recorded.remote(op, *args) if method == "recorded" else getattr(supervisor, method).remote(*args)
        except Exception as exc:  # noqa: BLE001 - Ray unavailable, the supervisor being created elsewhere
            log.warning("supervisor not reachable for %s: %s", method if op is None else op, exc)
            self._supervisor = None
            raise unavailable("Essential's supervisor is not reachable right now; retry shortly") from None
        try:
            reply = await remote
        except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError, ray.exceptions.RaySystemError) as exc:
            log.warning("supervisor call %s failed: %s", op, exc)
            self._supervisor = None
            raise unavailable("Essential's supervisor is not reachable right now (restarting?); retry shortly") from None
        except ray.exceptions.RayTaskError as exc:
            cause = exc.cause if isinstance(getattr(exc, "cause", None), BaseException) else exc
            log.error("supervisor %s failed: %r", method if op is None else op, cause)
            raise internal(f"Essential failed on this request ({type(cause).__name__}); it is logged") from None
        error = reply.get("error")
        if error:
            raise from_reply(error)
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
        except Exception:  # noqa: BLE001 - never a bare 500 page: the envelope, and the log
            log.exception("HTTP %s %s failed", request.method, request.url.path)
            return error_response(internal("Essential failed on this request; it is logged"))

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
        """Deliver a signal (``{"name", "payload", "key"}``) to any saga; stored durably first."""

        async def work() -> tuple[int, Any]:
            sid = saga_id_of(saga_id)
            body = await self._body(request)
            try:
                signal = SignalRequest.model_validate({**body, "saga": sid})
            except ValidationError as exc:
                fields = [{"field": f, "reason": r} for f, r in field_problems(exc, "<body>")]
                if "saga" in body:
                    fields.insert(0, {"field": "saga", "reason": "unknown field; a signal has name, payload and key"})
                raise HttpError(400, "InvalidField", "; ".join(f"{f['field']}: {f['reason']}" for f in fields), fields) from None
            if "saga" in body:
                raise bad("saga", "unknown field; a signal has name, payload and key")
            reply = await self._call(None, signal.saga, signal.name, signal.payload, signal.key, method="signal")
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
            sid = saga_id_of(saga_id)
            reason = request.query_params.get("reason") or "aborted over HTTP"
            reply = await self._call("abort", sid, reason[:500], None)
            return 200, {"data": _doc(reply["saga"])}

        return await self._serve(request, work)

    @API.get("/essential/sagas/{saga_id}/commit")
    async def commit(self, saga_id: str, request: Request) -> JSONResponse:
        async def work() -> tuple[int, Any]:
            return 200, {"data": _doc((await self._call("commit", saga_id_of(saga_id)))["saga"])}

        return await self._serve(request, work)

    @API.get("/essential/sagas/{saga_id}")
    async def get(self, saga_id: str, request: Request) -> JSONResponse:
        async def work() -> tuple[int, Any]:
            if saga_id in ("start", "add"):  # the POST routes, asked with GET
                raise HttpError(405, "MethodNotAllowed", f"GET /essential/sagas/{saga_id} is not allowed; it takes POST",
                                headers={"Allow": "POST"})  # fmt: skip
            return 200, {"data": _doc((await self._call("get", saga_id_of(saga_id)))["saga"])}

        return await self._serve(request, work)

    @API.get("/essential/sagas")
    async def list_sagas(self, request: Request) -> JSONResponse:
        async def work() -> tuple[int, Any]:
            params = self._params(request)
            limit, skip = paging(params, 50)
            reply = await self._call("list", saga_filters(params), limit, skip)
            body: dict[str, Any] = {"items": [_doc(s) for s in reply["sagas"]]}
            if reply.get("unreadable"):
                body["unreadable"] = reply["unreadable"]  # stored documents Essential cannot read, named
            return 200, body

        return await self._serve(request, work)

    @API.get("/essential/saga-stages")
    async def stages(self, request: Request) -> JSONResponse:
        async def work() -> tuple[int, Any]:
            params = self._params(request)
            limit, skip = paging(params, 200)
            reply = await self._call("stage_list", stage_filters(params), limit, skip)
            body: dict[str, Any] = {"items": reply["stages"]}
            if reply.get("unreadable"):
                body["unreadable"] = reply["unreadable"]
            return 200, body

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
