"""A small client for the pull API (stream/api.py), on httpx: what a shop's backend calls.

    from stream.client import OffersClient

    with OffersClient("http://127.0.0.1:8470", token) as client:
        offer = client.offers("user-42", limit=3)  # a preview: spends nothing
        if offer["action"] != "none":
            shown = client.claim("user-42")  # spends budget and caps, publishes the decision

Any worker of the group answers for any user. A 503 (a rebalance moves partitions) is retried
after its ``Retry-After``, a few times; every other error raises :class:`ApiError` with the
API's error code and message.
"""

from __future__ import annotations

import ssl
import time
import uuid
from types import TracebackType
from typing import Any
from urllib.parse import quote

import httpx

RETRIED_STATUSES = frozenset({503})


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status, self.code, self.message = status, code, message


class OffersClient:
    def __init__(self, base_url: str, token: str, *, timeout: float = 2.0,
                 retries: int = 3, max_wait: float = 5.0,
                 verify: str | bool = True) -> None:  # str: a CA file to trust
        self.retries, self.max_wait = retries, max_wait
        trust = ssl.create_default_context(cafile=verify) if isinstance(verify, str) else verify
        self._http = httpx.Client(base_url=base_url.rstrip("/"), timeout=timeout,
                                  headers={"Authorization": f"Bearer {token}"}, verify=trust)

    def __enter__(self) -> OffersClient:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def offers(self, user_id: str, limit: int | None = None) -> dict[str, Any]:
        """What the policy would offer the user now; nothing is spent or published."""
        params = {"limit": str(limit)} if limit is not None else None
        return self._call("GET", f"/v1/users/{_segment(user_id)}/offers", params=params)

    def claim(self, user_id: str, idempotency_key: str | None = None) -> dict[str, Any]:
        """Claim the user's offer to show it. A timeout or a 503 is retried under the same
        key, which is safe: the answer is the decision made the first time. The key used is
        in the answer (``idempotency_key``): pass it again to retry later."""
        key = idempotency_key or uuid.uuid4().hex
        answer = self._call("POST", f"/v1/users/{_segment(user_id)}/offers/claim",
                            headers={"Idempotency-Key": key}, retry_timeouts=True)
        return answer | {"idempotency_key": key}

    def vector(self, user_id: str) -> dict[str, Any]:
        return self._call("GET", f"/v1/users/{_segment(user_id)}/vector")

    def ready(self) -> bool:
        return self._http.get("/readyz").status_code == 200

    def _call(self, method: str, path: str, retry_timeouts: bool = False,
              **kwargs: Any) -> dict[str, Any]:  # noqa: ANN401
        """``retry_timeouts``: also retry what may have been done (a claim under its key);
        reads are always retried."""
        retried = RETRIED_STATUSES | ({504} if retry_timeouts else set())
        for attempt in range(self.retries + 1):
            last = attempt == self.retries
            try:
                response = self._http.request(method, path, **kwargs)
            except httpx.TimeoutException:
                if last or not (retry_timeouts or method == "GET"):
                    raise
                continue
            if response.status_code in retried and not last:
                time.sleep(min(self.max_wait, float(response.headers.get("Retry-After", 1))))
                continue
            break
        body = _json(response)
        if response.status_code != 200:
            raise ApiError(response.status_code, str(body.get("error", "http_error")),
                           str(body.get("message", response.text[:200])))
        return body


def _segment(user_id: str) -> str:
    return quote(user_id, safe="")


def _json(response: httpx.Response) -> dict[str, Any]:
    try:
        body = response.json()
    except ValueError:
        return {}
    return body if isinstance(body, dict) else {}
