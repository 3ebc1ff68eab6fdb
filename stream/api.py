"""The pull API: offers, claims and user vectors over HTTP, answered by the worker that owns
the user (docs/api.md).

Every worker serves it on faust's web server (aiohttp), on the event loop that runs the
stream, so a request reads the user's state between two steps of a micro-batch, never a
half-decoded one, and a claim takes the batch lock like the cart timer does.

- ``GET /v1/users/{user_id}/offers?limit=k``: what the policy would decide for the user now,
  on the same code and state as a decision (:meth:`Pipeline.preview`), changing nothing;
- ``POST /v1/users/{user_id}/offers/claim`` with an ``Idempotency-Key`` header: decide, spend
  budget and caps, publish to `decisions` (:meth:`Pipeline.claim`); the same key within
  ``api.idempotency_seconds`` answers with the same decision;
- ``GET /v1/users/{user_id}/vector``: the user's vector, base64 little-endian float16;
- ``GET /healthz`` (the process serves), ``GET /readyz`` (partitions assigned, state
  recovered, consent caught up), ``GET /v1/openapi.json``: no token needed.

**Routing.** A user lives on the partition ``murmur2(user_id)`` picks; the worker that owns it
in the consumer group answers. Any worker accepts any request: one for a user another worker
owns is forwarded to the URL that worker advertised in the group's assignment (faust's
partition assignor publishes each member's URL with the changelog partitions it holds:
``app.router.table_metadata``). faust's own ``route_req`` is not used because it drops the
request body and the response's headers (``Retry-After``). A forwarded request carries
``X-Promo-Forwarded``; a worker that gets one for a user it does not own answers 503 rather
than forward again. While this worker is between assignments (a rebalance, state restoring)
every user request answers 503 with ``Retry-After``: never stale or another owner's data.

**Hygiene.** Bearer tokens (compared in constant time), a token bucket per token, a body
limit, a timeout per request, JSON errors ``{"error": code, "message": ...}``, metrics per
endpoint and status (no user labels), one access-log line per request with the user's
pseudonym (:func:`stream.logs.user_ref`), never the path it came in on.
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import logging
import re
import ssl
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson
from aiohttp import web
from yarl import URL

from stream.config import ApiSettings
from stream.contracts import MAX_ID_LENGTH, Arm
from stream.logs import user_ref
from stream.metrics import Metrics
from stream.openapi import openapi_document
from stream.pipeline import Claim, ClaimAnswer, Pipeline
from stream.policy import in_holdout
from stream.topics import expected_partition

log = logging.getLogger(__name__)
access_log = logging.getLogger("stream.api.access")

FORWARDED_HEADER = "X-Promo-Forwarded"
IDEMPOTENCY_HEADER = "Idempotency-Key"
IDEMPOTENCY_KEY = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
#: Endpoints by route: the ``endpoint`` label of the API's metrics and access log.
ENDPOINTS = {
    "/v1/users/{user_id}/offers": "offers",
    "/v1/users/{user_id}/offers/claim": "claim",
    "/v1/users/{user_id}/vector": "vector",
    "/healthz": "healthz",
    "/readyz": "readyz",
    "/v1/openapi.json": "openapi",
}
PUBLIC = frozenset({"healthz", "readyz", "openapi"})  # probes and the description
# Claims queue for the batch lock (each commits its own transaction under exactly-once);
# past this many waiting, a claim answers 503 rather than hold the stream back.
MAX_CLAIMS_WAITING = 64
#: Reason codes that mean the answer is the cold-start one (no personal vector behind it).
COLD_CODES = frozenset({"cold_start", "model_unavailable", "vector_unavailable"})


class ApiError(Exception):
    """An answer other than 200, as JSON."""

    def __init__(self, status: int, code: str, message: str,
                 headers: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message
        self.headers = dict(headers or {})

    def response(self) -> web.Response:
        return json_response({"error": self.code, "message": self.message}, self.status,
                             self.headers)


def json_response(body: Mapping[str, Any], status: int = 200,
                  headers: Mapping[str, str] | None = None) -> web.Response:
    return web.Response(body=orjson.dumps(body), status=status, headers=headers,
                        content_type="application/json")


class TokenBucket:
    """``rate`` requests a second on average, ``burst`` at once."""

    def __init__(self, rate: float, burst: int, clock: Callable[[], float]) -> None:
        self.rate, self.burst, self.clock = rate, burst, clock
        self.tokens = float(burst)
        self.at = clock()

    def take(self) -> float:
        """0 if a request may go now, else the seconds until one may."""
        now = self.clock()
        self.tokens = min(self.burst, self.tokens + (now - self.at) * self.rate)
        self.at = now
        if self.tokens >= 1:
            self.tokens -= 1
            return 0.0
        return (1 - self.tokens) / self.rate


@dataclass
class Ownership:
    """What the worker knows about who owns which partition; given by the app."""

    ready: Callable[[], bool]  # assigned, state recovered, consent caught up
    owned: Callable[[], set[int]]  # events partitions this worker owns now
    owners: Callable[[], Mapping[str, set[int]]]  # advertised URL -> partitions it owns
    # Under the batch lock, committed; None: the partition moved while the claim waited.
    claim: Callable[[Claim], Awaitable[ClaimAnswer | None]]


class Api:
    """The endpoints, the middleware that guards them, and the forwarding between workers."""

    def __init__(self, settings: ApiSettings, partitions: int, metrics: Metrics,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.settings = settings
        self.partitions = partitions
        self.metrics = metrics
        self.clock = clock
        self.tokens = settings.accepted_tokens() if settings.enabled else frozenset()
        self.own_url = settings.url().rstrip("/")
        self._buckets: dict[str, TokenBucket] = {}
        self._claims_waiting = 0
        self._client: aiohttp.ClientSession | None = None
        self.pipeline: Pipeline | None = None
        self.ownership: Ownership | None = None

    def attach(self, pipeline: Pipeline, ownership: Ownership) -> None:
        self.pipeline = pipeline
        self.ownership = ownership

    def add_routes(self, router: web.UrlDispatcher) -> None:
        router.add_get("/healthz", self.healthz)
        router.add_get("/readyz", self.readyz)
        router.add_get("/v1/openapi.json", self.openapi)
        router.add_get("/v1/users/{user_id}/offers", self.offers)
        router.add_post("/v1/users/{user_id}/offers/claim", self.claim)
        router.add_get("/v1/users/{user_id}/vector", self.vector)

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()
            self._client = None

    # --- the guard around every request -------------------------------------------------------

    @web.middleware
    async def middleware(self, request: web.Request,
                         handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                         ) -> web.StreamResponse:
        started = time.perf_counter()
        endpoint = _endpoint(request)
        try:
            self._admit(request, endpoint)
            async with asyncio.timeout(self.settings.request_timeout_seconds):
                response = await handler(request)
        except ApiError as exc:
            response = exc.response()
        except TimeoutError:
            response = ApiError(504, "timeout", "the request took longer than "
                                f"{self.settings.request_timeout_seconds:g} s").response()
        except web.HTTPException as exc:  # no such route, method, a body too large
            response = ApiError(exc.status, _http_code(exc.status), exc.reason).response()
        except Exception:
            log.exception("request failed", extra={"endpoint": endpoint})
            response = ApiError(500, "internal", "the worker failed to answer; "
                                "see its log").response()
        elapsed = time.perf_counter() - started
        self.metrics.api_requests.labels(endpoint=endpoint, status=str(response.status)).inc()
        self.metrics.api_request_seconds.labels(endpoint=endpoint).observe(elapsed)
        user_id = request.match_info.get("user_id")
        access_log.info("request", extra={
            "method": request.method, "endpoint": endpoint, "status": response.status,
            "ms": round(elapsed * 1000, 2), "user": user_ref(user_id) if user_id else None,
            "forwarded": FORWARDED_HEADER in request.headers})
        return response

    def _admit(self, request: web.Request, endpoint: str) -> None:
        """Size, token and rate limit, before any work is done for the request."""
        length = request.content_length
        if length is not None and length > self.settings.max_body_bytes:
            raise ApiError(413, "too_large", f"the body is {length} bytes; at most "
                           f"{self.settings.max_body_bytes} are accepted")
        if endpoint in PUBLIC:
            return
        scheme, _, given = request.headers.get("Authorization", "").partition(" ")
        token = self._known(given.strip()) if scheme.lower() == "bearer" else None
        if token is None:
            raise ApiError(401, "unauthorized", "send a valid token: Authorization: Bearer "
                           "<token>", {"WWW-Authenticate": 'Bearer realm="promo-stream"'})
        bucket = self._buckets.get(token)  # one per accepted token, however it was spelled
        if bucket is None:
            bucket = self._buckets[token] = TokenBucket(
                self.settings.rate_limit_per_second, self.settings.rate_limit_burst, self.clock)
        wait = bucket.take()
        if wait:
            raise ApiError(429, "rate_limited", "too many requests for this token",
                           {"Retry-After": str(max(1, round(wait + 0.5)))})

    def _known(self, given: str) -> str | None:
        """The accepted token ``given`` is, or None."""
        raw = given.encode("utf-8", "surrogateescape")  # any header bytes: refused, not a 500
        found = None
        for accepted in sorted(self.tokens):  # every comparison made: no early exit to time
            if hmac.compare_digest(raw, accepted.encode()):
                found = accepted
        return found if given else None

    # --- endpoints ---------------------------------------------------------------------------

    async def healthz(self, request: web.Request) -> web.Response:
        return json_response({"status": "ok"})

    async def readyz(self, request: web.Request) -> web.Response:
        ownership = self._ownership()
        if not ownership.ready():
            raise self._unavailable("not ready: partitions are being assigned or restored")
        return json_response({"ready": True, "partitions": sorted(ownership.owned())})

    async def openapi(self, request: web.Request) -> web.Response:
        return json_response(openapi_document())

    async def offers(self, request: web.Request) -> web.StreamResponse:
        user_id = _user_id(request)
        limit = _limit(request)
        partition, forwarded = await self._route(request, user_id)
        if forwarded is not None:
            return forwarded
        pipeline = self._pipeline()
        preview = pipeline.preview(user_id, partition, limit)
        decision = orjson.loads(preview.decision.to_json()) if preview.decision else None
        return json_response(self._offer(user_id, decision, known=preview.known))

    async def claim(self, request: web.Request) -> web.StreamResponse:
        user_id = _user_id(request)
        key = request.headers.get(IDEMPOTENCY_HEADER, "")
        if not IDEMPOTENCY_KEY.match(key):
            raise ApiError(400, "bad_idempotency_key", f"send an {IDEMPOTENCY_HEADER} header "
                           "of 1-128 letters, digits or ._:- (a fresh UUID per offer shown)")
        await request.read()  # the body is not used; reading it enforces the size limit
        partition, forwarded = await self._route(request, user_id)
        if forwarded is not None:
            return forwarded
        if self._claims_waiting >= MAX_CLAIMS_WAITING:
            raise self._unavailable("too many claims waiting for this worker's batch lock")
        self._claims_waiting += 1
        try:
            # Once started, a claim finishes even if the request times out meanwhile: a
            # retry with the same key then answers with its decision.
            answer = await asyncio.shield(
                self._ownership().claim(Claim(partition, user_id, key)))
        finally:
            self._claims_waiting -= 1
        if answer is None:
            raise self._unavailable("the user's partition moved to another worker")
        body = self._offer(user_id, answer.decision, known=True)
        if answer.decision is not None:
            body |= {"decision_id": answer.decision["decision_id"],
                     "created_at": answer.decision["created_at"]}
        return json_response(body | {"replayed": answer.replayed})

    async def vector(self, request: web.Request) -> web.StreamResponse:
        user_id = _user_id(request)
        partition, forwarded = await self._route(request, user_id)
        if forwarded is not None:
            return forwarded
        found = self._pipeline().vector(user_id, partition)
        if found is None:
            raise ApiError(404, "no_vector", "the worker holds no vector for this user (an "
                           "unknown user, or no model has served them yet)")
        return json_response({
            "user_id": user_id, "dtype": "float16", "byte_order": "little",
            "dim": int(found.vector.shape[0]),
            "vector": base64.b64encode(found.vector.astype("<f2").tobytes()).decode(),
            "model_version": found.model_version, "updated_at": found.updated_at,
            "current": found.current})

    # --- answers -----------------------------------------------------------------------------

    def _offer(self, user_id: str, decision: Mapping[str, Any] | None,
               known: bool) -> dict[str, Any]:
        """What the shop shows: a holdout user's answer shows nothing (its decision, if it
        is a claim, is still published, as the stream's holdout decisions are)."""
        pipeline = self._pipeline()
        if decision is None:  # consent allows neither channel
            holdout = in_holdout(user_id, pipeline.policy_config.holdout_percent)
            return {"user_id": user_id, "known_user": known, "cold_start": not known,
                    "arm": Arm.HOLDOUT if holdout else Arm.TREATMENT, "action": "none",
                    "coupon": None, "items": [], "score": 0.0,
                    "reasons": [{"code": "opted_out"}], "model_version": None,
                    "policy_version": None}
        reasons = list(decision["reasons"])
        shown = decision["arm"] == Arm.TREATMENT
        if not shown:
            reasons.append({"code": "holdout"})
        push = decision.get("push") or {}
        return {
            "user_id": user_id, "known_user": known,
            "cold_start": any(r.get("code") in COLD_CODES for r in reasons),
            "arm": decision["arm"], "action": decision["action"] if shown else "none",
            "coupon": decision.get("coupon") if shown else None,
            "items": list(push.get("items", [])) if shown else [],
            "score": decision["score"], "reasons": reasons,
            "model_version": decision["model_version"],
            "policy_version": decision["policy_version"]}

    # --- routing -----------------------------------------------------------------------------

    async def _route(self, request: web.Request,
                     user_id: str) -> tuple[int, web.StreamResponse | None]:
        """The user's partition, and None if this worker answers, else the owner's answer."""
        partition = expected_partition(user_id.encode(), self.partitions)
        ownership = self._ownership()
        if not ownership.ready():
            raise self._unavailable("this worker is between assignments (a rebalance)")
        if partition in ownership.owned():
            return partition, None
        if FORWARDED_HEADER in request.headers:
            raise self._unavailable("ownership is moving: the forwarding worker's view of "
                                    "the group is out of date")
        owner = next((url for url, mine in ownership.owners().items() if partition in mine),
                     None)
        if owner is None or owner.rstrip("/") == self.own_url:
            raise self._unavailable("no worker owns this user's partition right now")
        self.metrics.api_forwarded.labels(endpoint=_endpoint(request)).inc()
        return partition, await self._forward(request, owner.rstrip("/"))

    async def _forward(self, request: web.Request, owner: str) -> web.Response:
        headers = {name: request.headers[name] for name in (
            "Authorization", IDEMPOTENCY_HEADER, "Content-Type", "Accept")
            if name in request.headers}
        headers[FORWARDED_HEADER] = self.own_url
        try:
            async with self._session().request(
                    # The path as it came: a user id may hold an encoded "/" or "%".
                    request.method, URL(owner + request.rel_url.raw_path_qs, encoded=True),
                    headers=headers,
                    data=await request.read()) as answer:
                body = await answer.read()
                kept = {name: answer.headers[name] for name in (
                    "Retry-After", "WWW-Authenticate") if name in answer.headers}
                return web.Response(body=body, status=answer.status, headers=kept,
                                    content_type=answer.content_type)
        except (aiohttp.ClientError, TimeoutError) as exc:
            # The exception's text names the URL, and so the user id: its type only.
            log.warning("forwarding failed", extra={"owner": owner,
                                                    "error": type(exc).__name__})
            raise self._unavailable("the worker that owns this user did not answer") from exc

    def _session(self) -> aiohttp.ClientSession:
        if self._client is None:
            context: ssl.SSLContext | bool = True
            if self.settings.tls_cafile:
                context = ssl.create_default_context(cafile=self.settings.tls_cafile)
            self._client = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=self.settings.forward_timeout_seconds),
                connector=aiohttp.TCPConnector(ssl=context, limit=64))
        return self._client

    def _unavailable(self, message: str) -> ApiError:
        return ApiError(503, "unavailable", message,
                        {"Retry-After": str(self.settings.retry_after_seconds)})

    def _ownership(self) -> Ownership:
        if self.ownership is None:
            raise self._unavailable("the worker is starting")
        return self.ownership

    def _pipeline(self) -> Pipeline:
        if self.pipeline is None:
            raise self._unavailable("the worker is starting")
        return self.pipeline


def _endpoint(request: web.Request) -> str:
    route = request.match_info.route
    resource = route.resource
    return ENDPOINTS.get(resource.canonical, "other") if resource is not None else "other"


def _user_id(request: web.Request) -> str:
    user_id = request.match_info["user_id"]
    if not user_id or len(user_id) > MAX_ID_LENGTH or user_id.isspace() \
            or not user_id.isprintable():
        raise ApiError(400, "bad_user_id", f"a user id is 1-{MAX_ID_LENGTH} printable "
                       "characters, URL-encoded in the path")
    return user_id


def _limit(request: web.Request) -> int | None:
    raw = request.query.get("limit")
    if raw is None:
        return None
    if not (raw.isascii() and raw.isdecimal() and len(raw) <= 3 and 1 <= int(raw) <= 50):
        raise ApiError(400, "bad_limit", "limit is a whole number of items from 1 to 50")
    return int(raw)


def _http_code(status: int) -> str:
    return {404: "not_found", 405: "method_not_allowed", 413: "too_large"}.get(
        status, "bad_request")


def tls_context(settings: ApiSettings) -> ssl.SSLContext | None:
    """The server's TLS context when a certificate is configured."""
    if not settings.tls_certfile:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(settings.tls_certfile, settings.tls_keyfile)
    return context
