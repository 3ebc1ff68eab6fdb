"""Learning from the product's own log and judging a policy on it (stream.offpolicy,
stream.uplift_train.from_outcomes, `promo evaluate-policy`, `promo publish` of an uplift model),
on hand-built logs whose true values are known: a push works on users with a cart open and on
no one else, and the logging policy favoured the wrong users."""

from __future__ import annotations

import asyncio
import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from stream import offpolicy, uplift_model, uplift_train
from stream.cli import main
from stream.config import PolicyConfig, Settings
from stream.contracts import Action, Arm, Closure, Outcome, TriggerKind
from stream.topics import ensure_topics
from tests.support import produce_raw, settings_env

# A conversion earns 30 x 0.3 = 9 (no purchases: the default order value); a push costs 0.5.
CONFIG = PolicyConfig(holdout_percent=10, margin_rate=0.3, default_order_value=30.0,
                      push_cost=0.5)
MARGIN, PUSH_COST = 9.0, 0.5
BASE, PUSHED_WITH_CART = 0.1, 0.5


def logged(n: int, seed: int, push_if_cart: float = 0.1,
           push_if_none: float = 0.9) -> list[Outcome]:
    """Decisions as the worker logs them. The logging policy pushes users *without* a cart
    (push_if_none) far more often than users with one: a naive reading of the log would say
    pushes do little. 10% of users are in the holdout."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        cart = int(rng.random() < 0.5)
        holdout = rng.random() < CONFIG.holdout_percent / 100
        p_push = push_if_cart if cart else push_if_none
        choices = {"none": 1 - p_push, "push": p_push}
        drawn = "push" if rng.random() < p_push else "none"
        greedy = max(choices, key=lambda k: choices[k])
        offer = greedy if holdout else drawn
        treated = not holdout and offer == "push"
        converted = rng.random() < (PUSHED_WITH_CART if treated and cart else BASE)
        rows.append(Outcome(
            decision_id=f"d{seed}-{i}", user_id=f"u{i}",
            arm=Arm.HOLDOUT if holdout else Arm.TREATMENT,
            action=Action.PUSH if offer == "push" else Action.NONE, coupon_id=None,
            discount=0.0, template="recommendation" if offer == "push" else None,
            trigger=TriggerKind.CART_ADD, model_version="m", policy_version="p",
            created_at=0, window_start=0, window_ms=1, closed_by=Closure.WINDOW,
            features={"cart_open": float(cart), "purchases": 0.0, "spend": 0.0,
                      "score": float(rng.random())},
            converted=bool(converted), offer=offer,
            propensity=1.0 if holdout else choices[offer], choices=choices))
    return rows


# Per decision: with a cart, a push earns 0.5 x 9 - 0.5 = 4.0 against 0.1 x 9 = 0.9 without.
TRUE_VALUE = {"push_to_carts": 0.5 * 4.0 + 0.5 * 0.9, "nothing": 0.9, "push_to_all": 0.5 * 4.0
              + 0.5 * (0.9 - 0.5)}


@pytest.fixture(scope="module")
def log() -> offpolicy.Log:
    return offpolicy.read_log(logged(20_000, seed=1), CONFIG)


@pytest.fixture(scope="module")
def candidate() -> uplift_model.UpliftModel:
    table = uplift_train.from_outcomes(logged(20_000, seed=2), CONFIG)
    return uplift_model.fit(table.columns, table.actions, table.converted, table.weights)


def test_every_row_gets_the_probability_of_what_it_actually_got(log: offpolicy.Log) -> None:
    holdout = np.asarray([o.arm == Arm.HOLDOUT for o in log.outcomes])
    assert set(log.got[holdout].tolist()) == {"none"}  # the holdout got nothing, whatever
    cart = np.asarray([o.features["cart_open"] for o in log.outcomes]) == 1
    # Without a cart: push 0.9 x 0.9 = 0.81, nothing 0.1 + 0.9 x 0.1 = 0.19.
    assert set(np.round(log.probability[~cart], 4).tolist()) == {0.81, 0.19}
    assert set(np.round(log.probability[cart], 4).tolist()) == {0.09, 0.91}
    assert "score" not in log.columns  # known only after deciding: never a model input


def test_weighted_rows_learn_what_the_push_changes_despite_the_biased_log(
        candidate: uplift_model.UpliftModel) -> None:
    users = {"cart_open": [0.0, 1.0], "purchases": [0.0, 0.0], "spend": [0.0, 0.0],
             "trigger": ["cart_add", "cart_add"]}
    uplift = candidate.uplift(users)[:, candidate.actions.index("push")]
    assert uplift[0] == pytest.approx(0.0, abs=0.03)
    assert uplift[1] == pytest.approx(PUSHED_WITH_CART - BASE, abs=0.05)


def test_ips_and_dr_recover_each_policys_true_value_within_their_intervals(
        log: offpolicy.Log, candidate: uplift_model.UpliftModel) -> None:
    cart = np.asarray([o.features["cart_open"] for o in log.outcomes]) == 1
    expected = offpolicy.reward_model(candidate, log, CONFIG)
    policies = {"push_to_carts": np.where(cart, "push", "none"),
                "nothing": np.full(len(cart), "none"), "push_to_all": np.full(len(cart), "push")}
    for name, chosen in policies.items():
        judged = offpolicy.judge(name, chosen, log, expected)
        for estimate in (judged.ips, judged.dr):
            assert estimate.low <= TRUE_VALUE[name] <= estimate.high, (name, estimate)
        assert judged.dr.high - judged.dr.low <= judged.ips.high - judged.ips.low + 1e-9
    # What the log did (mostly pushing those without a cart) is worth less than either.
    naive = float(log.reward.mean())
    assert naive < TRUE_VALUE["push_to_carts"] - 0.5


def test_the_candidates_policy_pushes_carts_only_and_beats_the_logging_policy(
        log: offpolicy.Log, candidate: uplift_model.UpliftModel) -> None:
    chosen = offpolicy.greedy_of(candidate, log, CONFIG)
    cart = np.asarray([o.features["cart_open"] for o in log.outcomes]) == 1
    assert np.mean(chosen[cart] == "push") > 0.95 and np.mean(chosen[~cart] == "none") > 0.95
    compared = offpolicy.compare(candidate, None, log, CONFIG)
    judged = {j.name: j for j in compared.judged}
    assert judged["candidate"].dr.low > judged["live"].dr.high
    assert judged["candidate"].dr.value == pytest.approx(TRUE_VALUE["push_to_carts"], abs=0.15)
    assert compared.gain.low > 0 and compared.rows == len(log.got)  # trained on another log


def test_a_model_trained_on_the_log_is_judged_only_on_decisions_it_did_not_see(
        tmp_path: Path) -> None:
    outcomes = logged(4_000, seed=6)
    model = uplift_train.train(uplift_train.from_outcomes(outcomes, CONFIG), tmp_path / "m",
                               held_out_share=0.3, seed=2, progress=False)
    log = offpolicy.read_log(outcomes, CONFIG)
    unseen = offpolicy.unseen_by(model, log)
    held = {o.decision_id for o in outcomes if offpolicy.held_out(o.decision_id, 0.3, 2)}
    assert {o.decision_id for o in unseen.outcomes} == held
    assert 0.25 * len(outcomes) < len(held) < 0.35 * len(outcomes)
    assert offpolicy.compare(model, None, log, CONFIG).rows == len(held)
    everything = uplift_train.train(uplift_train.from_outcomes(outcomes, CONFIG),
                                    tmp_path / "all", held_out_share=0.0, progress=False)
    with pytest.raises(ValueError, match="trained on every decision"):
        offpolicy.compare(everything, None, log, CONFIG)


def test_the_self_normalized_interval_matches_its_spread_over_repeated_logs() -> None:
    # The delta-method interval of SNIPS, over 200 independent logs of the same policy: its
    # average half-width is about 1.96 standard deviations of the estimates themselves.
    cart_policy = lambda log: np.where(  # noqa: E731
        np.asarray([o.features["cart_open"] for o in log.outcomes]) == 1, "push", "none")
    estimates, halves = [], []
    for seed in range(200):
        log = offpolicy.read_log(logged(1_000, seed=100 + seed), CONFIG)
        judged = offpolicy.judge("p", cart_policy(log), log, lambda offers: np.zeros(len(offers)))
        estimates.append(judged.ips.value)
        halves.append((judged.ips.high - judged.ips.low) / 2)
    assert np.mean(halves) == pytest.approx(1.96 * np.std(estimates), rel=0.1)


def send_outcomes(settings: Settings, outcomes: list[Outcome]) -> None:
    asyncio.run(ensure_topics(settings.kafka))
    asyncio.run(produce_raw(settings.kafka.bootstrap_servers, settings.kafka.outcomes_topic,
                            [(o.decision_id.encode(), o.to_json()) for o in outcomes]))


def test_a_model_trained_from_the_topic_is_published_and_a_worse_one_refused(
        settings: Settings, tmp_path: Path) -> None:
    send_outcomes(settings, logged(6_000, seed=3))
    env = settings_env(settings) | {"PROMO_POLICY_HOLDOUT_PERCENT": "10",
                                    "PROMO_POLICY_PUSH_COST": str(PUSH_COST)}
    runner = CliRunner()
    trained = runner.invoke(main, ["train-uplift", "--from-kafka", "--out",
                                   str(tmp_path / "good"), "--no-progress"], env=env)
    assert trained.exit_code == 0, trained.output
    # A model that believes the opposite: pushes work only without a cart.
    flipped = [o for o in logged(6_000, seed=4) if True]
    for o in flipped:
        o.features["cart_open"] = 1.0 - o.features["cart_open"]
    table = uplift_train.from_outcomes(flipped, CONFIG)
    bad = uplift_model.fit(table.columns, table.actions, table.converted, table.weights)
    uplift_model.save(bad, tmp_path / "bad")

    live = tmp_path / "uplift-current"
    judged = runner.invoke(main, ["evaluate-policy", "--candidate", str(tmp_path / "good"),
                                  "--from-kafka", "--json", "--no-progress"], env=env)
    assert judged.exit_code == 0, judged.output
    policies = {p["name"]: p for p in json.loads(judged.output)["policies"]}
    assert policies["candidate"]["dr"]["value"] > policies["live"]["dr"]["value"]

    def publish(candidate: str) -> dict[str, object]:
        done = runner.invoke(main, ["publish", "--candidate", str(tmp_path / candidate),
                                    "--live", str(live), "--from-kafka", "--json"], env=env)
        assert done.exit_code == 0, done.output
        return dict(json.loads(done.output.strip().splitlines()[-1]))

    first = publish("good")
    assert first["published"] is True, first  # beats the policy that wrote the log
    assert first["gain"]["low"] > 0
    assert live.resolve() == (tmp_path / "good").resolve()
    refused = publish("bad")
    assert refused["published"] is False and live.resolve() == (tmp_path / "good").resolve()


def test_decisions_too_recent_to_have_closed_without_a_conversion_are_left_out() -> None:
    # A conversion closes its window at once, a window without one only when it runs out: the
    # newest decisions are in the log mostly when they converted, and would flatter offers.
    old = [dataclasses.replace(o, window_start=1_000 + i, closed_by=Closure.CONVERSION
                               if o.converted else Closure.WINDOW)
           for i, o in enumerate(logged(1_000, seed=3))]
    recent = [dataclasses.replace(o, decision_id=f"new-{i}", window_start=10_000 + i,
                                  converted=True, closed_by=Closure.CONVERSION)
              for i, o in enumerate(logged(300, seed=4))]
    log = offpolicy.read_log(old + recent, CONFIG)
    newest_ran_out = max(o.window_start for o in old if not o.converted)
    assert {o.decision_id for o in log.outcomes} == {
        o.decision_id for o in old if o.window_start <= newest_ran_out}
    with pytest.raises(ValueError, match="run out"):
        offpolicy.read_log(recent, CONFIG)
