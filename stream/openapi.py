"""The pull API's OpenAPI 3.1 description, served at ``/v1/openapi.json`` (stream/api.py)."""

from __future__ import annotations

from functools import cache
from typing import Any

from stream.contracts import MAX_ID_LENGTH


def _error(description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {
        "schema": {"$ref": "#/components/schemas/Error"}}}}


_USER_ID = {"name": "user_id", "in": "path", "required": True,
            "description": "The user id events carry, URL-encoded.",
            "schema": {"type": "string", "minLength": 1, "maxLength": MAX_ID_LENGTH}}
_COMMON_ERRORS = {
    "400": _error("A malformed user id, limit or idempotency key."),
    "401": _error("No valid bearer token."),
    "413": _error("The body is larger than api.max_body_bytes."),
    "429": _error("Over the token's rate limit; see Retry-After."),
    "503": _error("The worker is between assignments (a rebalance) or the owner did not "
                  "answer; retry after Retry-After seconds."),
    "504": _error("The answer took longer than api.request_timeout_seconds."),
}

_OFFER = {
    "type": "object",
    "required": ["user_id", "known_user", "cold_start", "arm", "action", "coupon", "items",
                 "score", "reasons", "model_version", "policy_version"],
    "properties": {
        "user_id": {"type": "string"},
        "known_user": {"type": "boolean",
                       "description": "The worker holds state for the user; false: the "
                                      "cold-start answer."},
        "cold_start": {"type": "boolean",
                       "description": "No personal vector behind the answer (popular items)."},
        "arm": {"enum": ["treatment", "holdout"]},
        "action": {"enum": ["coupon", "push", "none"],
                   "description": "What to show; a holdout user is shown nothing."},
        "coupon": {"type": ["object", "null"], "properties": {
            "coupon_id": {"type": "string"}, "discount": {"type": "number"},
            "min_spend": {"type": "number"}, "expires_at": {"type": "integer"}}},
        "items": {"type": "array", "items": {"type": "string"},
                  "description": "Recommended item ids, best first."},
        "score": {"type": "number"},
        "reasons": {"type": "array", "items": {"type": "object", "required": ["code"]}},
        "model_version": {"type": ["string", "null"]},
        "policy_version": {"type": ["string", "null"]},
    },
}


@cache
def openapi_document() -> dict[str, Any]:
    bearer: list[dict[str, list[str]]] = [{"bearer": []}]
    return {
        "openapi": "3.1.0",
        "info": {"title": "promo-stream pull API", "version": "1",
                 "description": "Offers and user vectors from the worker that owns the user. "
                                "See docs/api.md."},
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": {
                "Error": {"type": "object", "required": ["error", "message"], "properties": {
                    "error": {"type": "string"}, "message": {"type": "string"}}},
                "Offer": _OFFER,
                "Claimed": {"allOf": [{"$ref": "#/components/schemas/Offer"}, {
                    "type": "object", "required": ["replayed"], "properties": {
                        "decision_id": {"type": "string"},
                        "created_at": {"type": "integer"},
                        "replayed": {"type": "boolean", "description":
                                     "The key was claimed before: the decision made then."}}}]},
                "Vector": {"type": "object", "required": [
                    "user_id", "dtype", "byte_order", "dim", "vector", "model_version",
                    "updated_at", "current"], "properties": {
                    "user_id": {"type": "string"}, "dtype": {"const": "float16"},
                    "byte_order": {"const": "little"}, "dim": {"type": "integer"},
                    "vector": {"type": "string", "contentEncoding": "base64"},
                    "model_version": {"type": "string"},
                    "updated_at": {"type": ["integer", "null"], "description":
                                   "Event time (ms) of the newest event the vector saw."},
                    "current": {"type": "boolean", "description":
                                "Computed by the serving model from all the user's events."}}},
            },
        },
        "paths": {
            "/v1/users/{user_id}/offers": {"get": {
                "summary": "What the policy would offer the user now (a preview: spends no "
                           "budget or cap, publishes nothing).",
                "security": bearer,
                "parameters": [_USER_ID, {
                    "name": "limit", "in": "query", "required": False,
                    "schema": {"type": "integer", "minimum": 1, "maximum": 50},
                    "description": "Items to recommend (default policy.push_items)."}],
                "responses": {"200": {"description": "The offer.", "content": {
                    "application/json": {"schema": {"$ref": "#/components/schemas/Offer"}}}},
                    **_COMMON_ERRORS}}},
            "/v1/users/{user_id}/offers/claim": {"post": {
                "summary": "Claim the offer to show it: budget and caps are spent and the "
                           "decision is published to `decisions`. Idempotent per key.",
                "security": bearer,
                "parameters": [_USER_ID, {
                    "name": "Idempotency-Key", "in": "header", "required": True,
                    "schema": {"type": "string", "pattern": "^[A-Za-z0-9._:-]{1,128}$"}}],
                "responses": {"200": {"description": "The claimed offer.", "content": {
                    "application/json": {
                        "schema": {"$ref": "#/components/schemas/Claimed"}}}},
                    **_COMMON_ERRORS}}},
            "/v1/users/{user_id}/vector": {"get": {
                "summary": "The user's current vector.",
                "security": bearer,
                "parameters": [_USER_ID],
                "responses": {"200": {"description": "The vector.", "content": {
                    "application/json": {
                        "schema": {"$ref": "#/components/schemas/Vector"}}}},
                    "404": _error("No vector for this user."), **_COMMON_ERRORS}}},
            "/healthz": {"get": {"summary": "The process serves.", "security": [],
                                 "responses": {"200": {"description": "Alive."}}}},
            "/readyz": {"get": {
                "summary": "Partitions assigned, state recovered, consent caught up.",
                "security": [], "responses": {"200": {"description": "Ready."},
                                              "503": _error("Not ready.")}}},
            "/v1/openapi.json": {"get": {"summary": "This document.", "security": [],
                                         "responses": {"200": {"description": "OpenAPI."}}}},
        },
    }
