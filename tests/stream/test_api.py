"""The pull API on the real broker, called with plain httpx as a shop's backend would: tokens,
previews that equal the decision a claim then publishes (exactly once per idempotency key,
within the budget), vectors, JSON errors, rate limits, access logs without user ids, and two
workers over TLS that answer alike for every user and say 503 while partitions move."""

from __future__ import annotations

import base64
import dataclasses
import functools
import ssl
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import numpy as np
import pytest

from deploy.kafka import launcher
from stream.config import Settings, load_settings
from stream.contracts import Coupon, Event
from stream.topics import ensure_topics, expected_partition
from tests.conftest import build_checkpoint
from tests.support import PromoProcess, certificate_for_localhost, sample, scrape, wait_until
from tests.workers import accounted, read_decisions, send_coupons, send_events, worker_env

# The live tests are marked `kafka` by the fixtures they use (tests/conftest.py).
pytestmark = pytest.mark.xdist_group("tests/stream/test_api.py")

TOKEN = "test-token-" + uuid.uuid4().hex[:8]
AUTH = {"Authorization": f"Bearer {TOKEN}"}
OTHER_TOKEN = "other-token-" + uuid.uuid4().hex[:8]  # a client of its own: its own rate limit
# Low enough that even a loaded machine sends faster than the bucket refills; the other tests,
# all on TOKEN, send far fewer than BURST requests.
RATE, BURST = 20, 100
ITEMS = ["13176", "24852", "21137", "21903", "47209", "47766", "16797", "26209"]
COUPON = Coupon("api-welcome", 5.0, budget=10.0)  # two coupons' worth, store-wide


def api_env(settings: Settings, api_port: int) -> dict[str, str]:
    return {"PROMO_API_ENABLED": "true", "PROMO_API_TOKENS": TOKEN,
            "PROMO_API_PORT": str(api_port), "PROMO_API_HOST": "127.0.0.1"}


def shoppers(prefix: str, n: int) -> list[str]:
    return [f"{prefix}-{uuid.uuid4().hex[:6]}-{i}" for i in range(n)]


def browse(users: list[str]) -> list[Event]:
    """A few views each (fires no trigger: distinct items), recent enough to be current."""
    now = int(time.time() * 1000)
    return [Event(f"{u}-v{k}", u, "view", ITEMS[k % len(ITEMS)], now - 60_000 + k)
            for u in users for k in range(4)]


# --- the guard, in-process: aiohttp's test requests against the middleware ------------------

def guarded(path: str, headers: dict[str, str]) -> tuple[int, dict[str, Any]]:
    """A request through the API's middleware to a route that answers 200 if admitted."""
    import asyncio

    import orjson
    from aiohttp import web
    from aiohttp.test_utils import make_mocked_request

    from stream.api import Api, _limit
    from stream.config import ApiSettings
    from stream.metrics import Metrics

    api = GUARD.setdefault("api", Api(ApiSettings(
        enabled=True, tokens=("tok",), rate_limit_per_second=1.0, rate_limit_burst=3),
        partitions=2, metrics=Metrics(), clock=lambda: 0.0))
    app = web.Application()

    async def handler(request: web.Request) -> web.Response:
        _limit(request)
        return web.json_response({"ok": True})

    app.router.add_get("/v1/users/{user_id}/offers", handler)
    request = make_mocked_request("GET", path, headers=headers, app=app)
    match = asyncio.run(app.router.resolve(request))
    request._match_info = match  # what aiohttp's server does before the handlers run
    response = asyncio.run(api.middleware(request, handler))
    return response.status, orjson.loads(response.body)


GUARD: dict[str, Any] = {}


def test_one_token_has_one_bucket_however_its_header_is_spaced() -> None:
    GUARD.clear()
    statuses = [guarded("/v1/users/u/offers", {"Authorization": spelled})[0]
                for spelled in ("Bearer tok", "Bearer  tok", "bearer tok", "Bearer tok ",
                                "Bearer tok")]
    assert statuses == [200, 200, 200, 429, 429]  # a burst of 3, then refused: one bucket


@pytest.mark.parametrize("header", ["Bearer t\u00f6k", "Basic tok", "Bearer", "tok", ""])
def test_a_malformed_or_foreign_authorization_is_refused_not_a_crash(header: str) -> None:
    GUARD.clear()
    status, body = guarded("/v1/users/u/offers", {"Authorization": header})
    assert status == 401 and body["error"] == "unauthorized"


@pytest.mark.parametrize("limit", ["\u00b2", "9" * 5000, "-1", "1.5", "0", "51"])
def test_a_limit_that_is_not_1_to_50_is_a_400(limit: str) -> None:
    GUARD.clear()
    status, body = guarded(f"/v1/users/u/offers?limit={quote(limit)}",
                           {"Authorization": "Bearer tok"})
    assert status == 400 and body["error"] == "bad_limit"


@dataclasses.dataclass
class Served:
    settings: Settings
    url: str
    proc: PromoProcess
    metrics_port: int
    users: list[str]


@pytest.fixture(scope="module")
def served(kafka_cluster: launcher.Cluster,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """One exactly-once worker with the API on, 20 users browsed, a coupon of two."""
    import asyncio

    tmp = tmp_path_factory.mktemp("api")
    run = uuid.uuid4().hex[:8]
    base = load_settings(environ={})
    settings = dataclasses.replace(
        base,
        kafka=dataclasses.replace(
            base.kafka, bootstrap_servers=kafka_cluster.bootstrap_servers, partitions=2,
            **{f"{name}_topic": f"{name}-{run}" for name in (
                "events", "dlq", "decisions", "vectors", "outcomes", "coupons",
                "preferences")}),
        worker=dataclasses.replace(base.worker, app_id=f"promo-api-{run}",
                                   data_dir=str(tmp / "worker"),
                                   processing_guarantee="exactly_once"))
    asyncio.run(ensure_topics(settings.kafka))
    send_coupons(settings, [COUPON])
    api_port, metrics_port = launcher.free_port(), launcher.free_port()
    checkpoint = tmp / "model"
    build_checkpoint(checkpoint)
    proc = PromoProcess(["worker"], worker_env(settings, metrics_port, checkpoint)
                        | api_env(settings, api_port)
                        | {"PROMO_API_TOKENS": f"{TOKEN},{OTHER_TOKEN}",
                           "PROMO_API_RATE_LIMIT_PER_SECOND": str(RATE),
                           "PROMO_API_RATE_LIMIT_BURST": str(BURST)}, tmp / "worker.log")
    try:
        proc.wait_for_log("worker ready", timeout=120)
        users = shoppers("api", 20)
        events = browse(users)
        send_events(settings, events)
        wait_until(lambda: accounted(metrics_port) >= len(events), timeout=60,
                   what="the browsing applied")
        yield Served(settings, f"http://127.0.0.1:{api_port}", proc, metrics_port, users)
    finally:
        assert proc.stop() == 0, proc.log_tail()


def get(served: Served, path: str, **kwargs: Any) -> httpx.Response:
    return httpx.get(served.url + path, timeout=5, **kwargs)


def claim(url: str, user: str, key: str) -> httpx.Response:
    return httpx.post(f"{url}/v1/users/{user}/offers/claim", timeout=10,
                      headers=AUTH | {"Idempotency-Key": key})


def test_probes_and_the_description_need_no_token_but_everything_else_does(
        served: Served) -> None:
    assert get(served, "/healthz").json() == {"status": "ok"}
    ready = get(served, "/readyz").json()
    assert ready["ready"] is True and sorted(ready["partitions"]) == [0, 1]
    spec = get(served, "/v1/openapi.json").json()
    assert spec["openapi"].startswith("3.") and "/v1/users/{user_id}/offers/claim" in spec["paths"]
    user = served.users[0]
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}):
        refused = get(served, f"/v1/users/{user}/offers", headers=headers)
        assert refused.status_code == 401
        assert refused.json()["error"] == "unauthorized"
        assert refused.headers["WWW-Authenticate"].startswith("Bearer")


def test_a_claim_publishes_what_the_preview_showed_once_per_key_within_the_budget(
        served: Served) -> None:
    claimed: dict[str, dict[str, Any]] = {}
    for user in served.users:
        preview = get(served, f"/v1/users/{user}/offers", headers=AUTH).json()
        first = claim(served.url, user, f"order-{user}")
        again = claim(served.url, user, f"order-{user}")
        assert first.status_code == again.status_code == 200, first.text
        shown, replay = first.json(), again.json()
        assert preview["known_user"] and not shown["replayed"] and replay["replayed"]
        assert replay["decision_id"] == shown["decision_id"]
        for field in ("arm", "action", "coupon", "items", "reasons", "model_version"):
            assert preview[field] == shown[field], (field, preview, shown)
        claimed[shown["decision_id"]] = shown
    published = [d for d in read_decisions(served.settings, isolation_level="read_committed")
                 if d["trigger_event_id"].startswith("claim:")]
    assert Counter(d["decision_id"] for d in published) == Counter(set(claimed))
    coupons = [d for d in published if d["action"] == "coupon" and d["arm"] == "treatment"]
    assert len(coupons) >= 1 and sum(d["coupon"]["discount"] for d in coupons) <= COUPON.budget
    shown_coupons = [c for c in claimed.values() if c["coupon"] is not None]
    assert len(shown_coupons) == len(coupons)  # a holdout user is shown nothing


def test_an_unknown_user_gets_the_cold_start_answer_and_no_vector(served: Served) -> None:
    stranger = f"stranger-{uuid.uuid4().hex[:8]}"
    answer = get(served, f"/v1/users/{stranger}/offers?limit=2", headers=AUTH)
    assert answer.status_code == 200
    body = answer.json()
    assert body["known_user"] is False and body["cold_start"] is True
    assert body["action"] in ("push", "none") and len(body["items"]) <= 2
    missing = get(served, f"/v1/users/{stranger}/vector", headers=AUTH)
    assert missing.status_code == 404 and missing.json()["error"] == "no_vector"


def test_a_known_users_vector_is_served_as_float16(served: Served) -> None:
    answer = get(served, f"/v1/users/{served.users[1]}/vector", headers=AUTH)
    assert answer.status_code == 200, answer.text
    body = answer.json()
    vector = np.frombuffer(base64.b64decode(body["vector"]), dtype="<f2")
    assert body["dtype"] == "float16" and vector.shape == (body["dim"],)
    assert np.isfinite(vector).all() and np.abs(vector).sum() > 0
    assert body["current"] is True and body["updated_at"] is not None


@pytest.mark.parametrize(("method", "path", "headers", "content", "status", "code"), [
    ("GET", "/v1/users/" + "u" * 300 + "/offers", {}, None, 400, "bad_user_id"),
    ("GET", "/v1/users/%20%20/offers", {}, None, 400, "bad_user_id"),
    ("GET", "/v1/users/someone/offers?limit=0", {}, None, 400, "bad_limit"),
    ("GET", "/v1/users/someone/offers?limit=lots", {}, None, 400, "bad_limit"),
    ("POST", "/v1/users/someone/offers/claim", {}, None, 400, "bad_idempotency_key"),
    ("POST", "/v1/users/someone/offers/claim", {"Idempotency-Key": "a b"}, None, 400,
     "bad_idempotency_key"),
    ("POST", "/v1/users/someone/offers/claim", {"Idempotency-Key": "k"}, b"x" * 10_000, 413,
     "too_large"),
    ("GET", "/v1/users/someone/nothing", {}, None, 404, "not_found"),
    ("DELETE", "/v1/users/someone/offers", {}, None, 405, "method_not_allowed"),
])
def test_malformed_requests_get_a_json_error(served: Served, method: str, path: str,
                                             headers: dict[str, str], content: bytes | None,
                                             status: int, code: str) -> None:
    answer = httpx.request(method, served.url + path, headers=AUTH | headers, content=content,
                           timeout=5)
    assert answer.status_code == status, answer.text
    assert answer.headers["Content-Type"].startswith("application/json")
    assert answer.json()["error"] == code and answer.json()["message"]


def test_a_client_over_its_rate_is_told_when_to_come_back_and_others_are_not_slowed(
        served: Served) -> None:
    other = {"Authorization": f"Bearer {OTHER_TOKEN}"}
    statuses: Counter[int] = Counter()
    started = time.monotonic()
    with httpx.Client(headers=other, timeout=5) as client:
        while not statuses[429] and time.monotonic() - started < 60:
            answer = client.get(f"{served.url}/v1/users/{served.users[0]}/offers")
            statuses[answer.status_code] += 1
            if answer.status_code == 429:
                assert answer.json()["error"] == "rate_limited"
                assert int(answer.headers["Retry-After"]) >= 1
    elapsed = time.monotonic() - started
    # A full bucket lets BURST through at once, then RATE a second: never fewer, never more.
    assert statuses[429] == 1, statuses
    assert BURST <= statuses[200] <= BURST + RATE * elapsed + 1, (statuses, elapsed)
    assert get(served, f"/v1/users/{served.users[0]}/offers", headers=AUTH).status_code == 200


def test_access_logs_name_users_by_pseudonym_only_and_metrics_count_requests(
        served: Served) -> None:
    marker = f"raw-id-{uuid.uuid4().hex}"
    for _ in range(3):
        get(served, f"/v1/users/{marker}/offers", headers=AUTH)
    get(served, f"/v1/users/{marker}/vector", headers=AUTH)
    wait_until(lambda: served.proc.log_path.read_text().count("endpoint=vector") >= 1,
               timeout=10, what="access lines")
    log = served.proc.log_path.read_text()
    access = [line for line in log.splitlines() if "stream.api.access" in line]
    assert len(access) >= 4
    assert marker not in log
    for user in served.users:
        assert f"/users/{user}/" not in log

    def counted() -> bool:  # the exporter serves the worker's snapshot of a second ago
        samples = scrape(served.metrics_port)
        return (sample(samples, "promo_api_requests_total", endpoint="offers",
                       status="200") >= 3
                and sample(samples, "promo_api_requests_total", endpoint="vector",
                           status="404") >= 1
                and sample(samples, "promo_api_request_duration_seconds_count",
                           endpoint="vector") >= 1)

    wait_until(counted, timeout=10, what="the requests counted by endpoint and status")


@pytest.mark.slow(seconds=45)  # two workers, one leaving: queued early under xdist
def test_any_worker_answers_for_any_user_over_tls_and_says_503_while_partitions_move(
        settings: Settings, run_worker: Any, checkpoints: dict[str, Path],
        tmp_path: Path) -> None:
    ca, cert, key = certificate_for_localhost(tmp_path, "api")
    tls = {"PROMO_API_TLS_CERTFILE": str(cert), "PROMO_API_TLS_KEYFILE": str(key),
           "PROMO_API_TLS_CAFILE": str(ca)}  # the workers forward to each other over HTTPS
    ports = [launcher.free_port() for _ in range(2)]
    workers = [run_worker(checkpoints["v1"], env=api_env(settings, port) | tls | {
        "PROMO_WORKER_DATA_DIR": f"{settings.worker.data_dir}-{n}"})
        for n, port in enumerate(ports)]
    urls = [f"https://127.0.0.1:{port}" for port in ports]
    trust = ssl.create_default_context(cafile=str(ca))
    http = httpx.Client(headers=AUTH, timeout=5, verify=trust)
    owned = functools.partial(_owned, http)
    wait_until(lambda: sorted(owned(urls[0]) + owned(urls[1])) == [0, 1]
               and all(owned(url) for url in urls),
               timeout=60, what="each worker to own a partition")
    with pytest.raises(httpx.HTTPError):  # TLS only: plain HTTP gets no answer
        httpx.get(f"http://127.0.0.1:{ports[0]}/healthz", timeout=5)
    # Ids as a shop may have them: a slash, a space, a percent sign, non-ASCII.
    users = shoppers("route", 36) + shoppers("shop/7", 2) + shoppers("ü€ 100%", 2)
    assert {expected_partition(u.encode(), 2) for u in users} == {0, 1}  # both must forward
    send_events(settings, browse(users))
    wait_until(lambda: sum(accounted(port) for _, port in workers) >= 4 * len(users),
               timeout=60, what="the browsing applied")

    def answers(url: str) -> dict[str, Any]:
        return {u: http.get(f"{url}/v1/users/{quote(u, safe='')}/offers").json()
                for u in users}

    first, second = answers(urls[0]), answers(urls[1])
    assert first == second
    assert all(a["known_user"] for a in first.values())
    wait_until(lambda: sum(sample(scrape(port), "promo_api_forwarded_total",
                                  endpoint="offers") for _, port in workers) == len(users),
               timeout=10, what="each user's answer forwarded once (the exporter lags 1 s)")

    seen: Counter[int] = Counter()
    wrong: list[Any] = []
    stop = threading.Event()

    def poll() -> None:
        while not stop.is_set():
            for user in users:
                answer = poller_http.get(f"{urls[0]}/v1/users/{quote(user, safe='')}/offers")
                seen[answer.status_code] += 1
                if answer.status_code == 503:
                    if "Retry-After" not in answer.headers:
                        wrong.append(("no Retry-After", answer.text))
                elif answer.status_code != 200 or answer.json() != first[user]:
                    wrong.append((answer.status_code, answer.text))

    poller_http = httpx.Client(headers=AUTH, timeout=5, verify=trust)  # one per thread
    poller = threading.Thread(target=poll)
    poller.start()
    try:
        assert workers[1][0].stop() == 0  # it leaves the group: its partition moves
        wait_until(lambda: owned(urls[0]) == [0, 1], timeout=60,
                   what="the remaining worker to own both partitions")
        time.sleep(0.5)
    finally:
        stop.set()
        poller.join(30)
        poller_http.close()
    assert not wrong, wrong[:3]
    assert seen[503] >= 1 and seen[200] >= 1, seen
    assert answers(urls[0]) == first
    http.close()


def _owned(http: httpx.Client, url: str) -> list[int]:
    try:
        answer = http.get(f"{url}/readyz")
    except httpx.HTTPError:
        return []
    return list(answer.json().get("partitions", [])) if answer.status_code == 200 else []
