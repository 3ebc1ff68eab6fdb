"""The learning loop on the real broker, at small scale: a worker with no uplift model explores
and logs; the shop's users answer by a known rule; `promo train-uplift --from-kafka` learns it
from the `outcomes` topic, `promo publish` serves it only because it beats the policy that
wrote the log, and the running worker swaps it in without a restart and decides by segment.

The rule: *browsers* (five views, then a cart add) buy only with a coupon, half or full
(persuadable); *direct* shoppers (a cart add straight away) buy anyway (sure things). The
propensity tiers give both a full coupon; the learnt policy should give browsers a coupon
and direct shoppers none."""

from __future__ import annotations

import asyncio
import json
import subprocess
import time
import uuid
from pathlib import Path

import pytest

from stream.config import Settings
from stream.contracts import Coupon, Event
from tests.support import PROMO, consume_all, settings_env, wait_until
from tests.workers import accounted, read_decisions, send_coupons, send_events

pytestmark = [pytest.mark.kafka, pytest.mark.slow(seconds=90)]

HOUR = 3_600_000
STORE_WIDE = Coupon(coupon_id="five-off", value=5.0, budget=100_000.0)


def shoppers(n: int, start_ms: int, tag: str) -> tuple[list[Event], dict[str, str]]:
    """n browsers and n direct shoppers, each with one cart add at ``start_ms``."""
    events, kind = [], {}
    for i in range(2 * n):
        user = f"{tag}-{uuid.uuid4().hex[:6]}-{i}"
        browser = i % 2 == 0
        kind[user] = "browser" if browser else "direct"
        if browser:
            events += [Event(f"{user}-v{k}", user, "view", f"sku-{k}", start_ms - 600_000 + k)
                       for k in range(5)]
        events.append(Event(f"{user}-c", user, "add_to_cart", "sku-9", start_ms, price=10.0))
    return events, kind


def answers(decisions: list[dict], kind: dict[str, str], at_ms: int) -> list[Event]:  # type: ignore[type-arg]
    """The shop's users by the rule: a purchase within the hour, or none."""
    bought = []
    for d in decisions:
        user = d["user_id"]
        coupon = d["coupon"] if d["arm"] == "treatment" else None
        if kind[user] == "direct" or coupon is not None:
            bought.append(Event(f"{user}-p", user, "purchase", "sku-9", at_ms, price=30.0,
                                coupon_id=coupon["coupon_id"] if coupon else None))
    return bought


def decision_of(settings: Settings, user: str) -> dict:  # type: ignore[type-arg]
    found: list[dict] = []  # type: ignore[type-arg]

    def decided() -> bool:
        found[:] = [d for d in read_decisions(settings, idle=0.5) if d["user_id"] == user]
        return bool(found)

    wait_until(decided, timeout=30, what=f"a decision for {user}")
    return found[0]


def promo(settings: Settings, *args: str, env: dict[str, str]) -> str:
    done = subprocess.run([PROMO, *args], env=settings_env(settings) | env, capture_output=True,
                          text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_the_worker_learns_from_its_own_log_and_serves_the_better_policy_without_restart(
        settings: Settings, run_worker, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    live = tmp_path / "models" / "uplift-current"  # nothing published yet: the tiers decide
    policy = {"holdout_percent": "20", "exploration_share": "0.5",
              "margin_rate": "0.3", "default_order_value": "30",
              "cart_abandon_seconds": str(30 * 86_400)}  # one decision per shopper: no reminders
    env = {"PROMO_WORKER_UPLIFT_CHECKPOINT": str(live),
           "PROMO_ATTRIBUTION_WINDOW_SECONDS": "3600", "PROMO_ATTRIBUTION_GRACE_SECONDS": "0"}
    cli_env = env | {f"PROMO_POLICY_{k.upper()}": v for k, v in policy.items()}
    send_coupons(settings, [STORE_WIDE])
    proc, port = run_worker(None, env=env, **policy)

    # 1. Explore: the tiers decide (a full coupon for everyone new) but half the treatment
    # decisions draw an offer at random, and every one logs its probabilities.
    start = int(time.time() * 1000) - 5 * HOUR
    events, kind = shoppers(150, start, "learn")
    send_events(settings, events)
    wait_until(lambda: accounted(port) >= len(events), timeout=60, what="the triggers")
    decisions = read_decisions(settings)
    assert len(decisions) == len(kind)
    treated = [d for d in decisions if d["arm"] == "treatment"]
    assert {d["offer"] for d in treated} == {"none", "coupon_full", "coupon_half"}
    for d in decisions:
        assert sum(d["choices"].values()) == pytest.approx(1.0, abs=1e-5)
        assert d["policy_version"] == "policy-3"
    # 2. The users answer; a later event moves event time past every window.
    purchases = answers(decisions, kind, start + 60_000)
    clock = [Event(f"clock-{i}", f"clock-{i}", "view", "sku-1", start + 2 * HOUR)
             for i in range(8)]
    send_events(settings, purchases + clock)
    wait_until(lambda: len(asyncio.run(consume_all(
        settings.kafka.bootstrap_servers, settings.kafka.outcomes_topic, idle=1.0,
        timeout=10))) >= len(decisions), timeout=90,
        what="an outcome per decision")

    # 3. Learn from the log, judge on it, publish: the tiers wasted coupons on sure things.
    candidate = tmp_path / "models" / "uplift-v1"
    promo(settings, "train-uplift", "--from-kafka", "--out", str(candidate), "--no-progress",
          env=cli_env)  # 30% of decisions held out: the ones it is judged on
    judged = json.loads(promo(settings, "evaluate-policy", "--candidate", str(candidate),
                              "--from-kafka", "--json", "--no-progress", env=cli_env))
    value = {p["name"]: p["dr"]["value"] for p in judged["policies"]}
    assert value["candidate"] > value["live"], value
    assert judged["gain"]["low"] > 0 and judged["rows"] < len(decisions), judged
    published = json.loads(promo(settings, "publish", "--candidate", str(candidate), "--live",
                                 str(live), "--from-kafka", "--json", env=cli_env)
                           .strip().splitlines()[-1])
    assert published["published"] is True and live.resolve() == candidate.resolve()

    # 4. The running worker swaps it in (it polls the path every second) and decides by
    # segment: probe with one cart add at a time until a decision names the new version.
    version = published["candidate"]["model_version"]
    later = int(time.time() * 1000) - HOUR // 2
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        probe, _ = shoppers(1, later, "probe")
        send_events(settings, probe)
        decided = decision_of(settings, probe[-1].user_id)
        if decided["policy_version"] == f"policy-3+{version}":
            break
    else:
        pytest.fail("the worker never served the published uplift model")
    fresh, fresh_kind = shoppers(20, later, "serve")
    send_events(settings, fresh)
    wait_until(lambda: sum(d["user_id"] in fresh_kind for d in read_decisions(settings))
               >= len(fresh_kind), timeout=60, what="the new shoppers' decisions")
    served = [d for d in read_decisions(settings) if d["user_id"] in fresh_kind]
    assert all(d["policy_version"] == f"policy-3+{version}" for d in served)
    greedy = [d for d in served if d["arm"] == "treatment"
              and "explored" not in [r["code"] for r in d["reasons"]]]
    assert greedy, "every decision explored or held out"
    right = {"browser": 0, "direct": 0}
    for d in greedy:
        segment = {r["code"] for r in d["reasons"]} & {"persuadable", "sure_thing",
                                                       "lost_cause", "do_not_disturb"}
        assert len(segment) == 1, d["reasons"]
        if fresh_kind[d["user_id"]] == "browser":
            right["browser"] += d["action"] == "coupon" and segment == {"persuadable"}
        else:
            right["direct"] += d["action"] == "none" and segment == {"sure_thing"}
    # Learnt from 300 shoppers, half of them exploring: most, not necessarily all, are right.
    for who, n in right.items():
        total = sum(fresh_kind[d["user_id"]] == who for d in greedy)
        assert n >= 0.8 * total, (who, n, total)
    assert proc.alive()
