"""Thompson sampling over offers in a few context buckets, learnt from outcomes as they arrive.

Between retrains of the uplift model (and before the first), the offer mix can still adapt:
for each **context bucket** (the trigger, and whether the user has bought before) and each
offer (nothing, each coupon tier, a push: the push's template follows from the trigger, so
the bucket names it), the closed decisions say how often users converted. A Beta posterior
per (bucket, offer) over the conversion rate, sampled once per decision, turns into each
feasible offer's sampled incremental profit, ``(rate(offer) - rate(none)) x margin - cost``
(:func:`stream.policy.offer_worth`; a coupon's money at its budget's shadow price); the best
sample wins. Offers that look good are chosen
more, offers still uncertain are tried now and then, and no threshold is set by hand.

- **Shared by all workers.** Every worker reads the compacted `outcomes` topic in full and
  follows it (:class:`OutcomeFollower`, as the coupon catalog is read), so all workers sample
  from the same counts, whichever partition a decision was made on. A restarted worker reads
  them back from the topic; a decision counts once (by its id).
- **Recent outcomes only**: decisions older than ``policy.bandit_window_days`` are forgotten,
  so the mix follows offers whose effect drifts.
- **Logged**: the chance of each offer under sampling has no closed form; it is estimated from
  :data:`DRAWS` draws that include the one that decided, so the offer made always has a
  positive logged probability and off-policy evaluation and training weigh it correctly.
- **Bounded** by everything else the policy applies: only feasible offers (consent, caps,
  quiet hours, budget pacing) are sampled, and the holdout is never treated.

The holdout's decisions count for "nothing" (what they got); an explored decision counts for
the offer it made. Deterministic: the draws are seeded by the decision id, so deciding the
same trigger again on the same counts draws the same.
"""

from __future__ import annotations

import asyncio
import hashlib
import heapq
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from stream.config import KafkaSettings
from stream.contracts import DAY_MS, Arm, Outcome

log = logging.getLogger(__name__)

DRAWS = 256  # draws that estimate each offer's chance to be chosen
NONE = "none"  # the uplift model's CONTROL: doing nothing


def bucket_of(features: Mapping[str, float], trigger: str) -> str:
    """A decision's context bucket: the trigger, and whether the user has bought before. Few
    on purpose: each bucket must gather enough outcomes between retrains to learn from."""
    buyer = "returning" if features.get("purchases", 0.0) > 0 else "new"
    return f"{trigger}/{buyer}"


@dataclass
class Counts:
    decisions: int = 0
    converted: int = 0


@dataclass
class OfferStats:
    """Closed decisions and conversions per (bucket, offer), from outcomes; one decision
    counts once, and decisions made over ``window_ms`` before the newest one are dropped."""

    window_ms: int = 14 * DAY_MS
    counts: dict[tuple[str, str], Counts] = field(default_factory=dict)
    _seen: set[str] = field(default_factory=set, repr=False)
    _newest: int = 0
    # (made at, decision id, bucket, offer, converted), oldest first: what to forget next.
    _by_age: list[tuple[int, str, str, str, bool]] = field(default_factory=list, repr=False)

    def add(self, outcome: Outcome) -> None:
        if outcome.evicted or outcome.decision_id in self._seen:
            return
        offer = NONE if outcome.arm == Arm.HOLDOUT else outcome.offer
        bucket = bucket_of(outcome.features, outcome.trigger)
        counts = self.counts.setdefault((bucket, offer), Counts())
        counts.decisions += 1
        counts.converted += outcome.converted
        self._seen.add(outcome.decision_id)
        heapq.heappush(self._by_age, (outcome.created_at, outcome.decision_id, bucket, offer,
                                      outcome.converted))
        newest = max(outcome.created_at, self._newest)
        self._newest = newest
        while self._by_age and self._by_age[0][0] < newest - self.window_ms:
            _, decision, old_bucket, old_offer, converted = heapq.heappop(self._by_age)
            self._seen.discard(decision)
            old = self.counts[(old_bucket, old_offer)]
            old.decisions -= 1
            old.converted -= converted

    def get(self, bucket: str, offer: str) -> Counts:
        return self.counts.get((bucket, offer), Counts())


def sample(stats: OfferStats, bucket: str, offers: Sequence[str],
           worth: Callable[[str, np.ndarray, np.ndarray], np.ndarray],
           decision_id: str) -> tuple[str, dict[str, float], dict[str, float]]:
    """Thompson sampling among ``offers``: (the chosen offer, each offer's chance to be chosen,
    each offer's posterior mean rate). ``worth(offer, rate, rate_none)`` is the incremental
    profit of ``offer`` at sampled rates (vectors over draws)."""
    rng = np.random.default_rng(int.from_bytes(
        hashlib.sha256(b"thompson:" + decision_id.encode()).digest()[:8], "big"))
    names = list(dict.fromkeys([NONE, *offers]))
    counts = {offer: stats.get(bucket, offer) for offer in names}
    rates = {offer: rng.beta(1 + c.converted, 1 + c.decisions - c.converted, size=DRAWS)
             for offer, c in counts.items()}
    values = np.stack([worth(offer, rates[offer], rates[NONE]) if offer != NONE
                       else np.zeros(DRAWS) for offer in names])
    # Ties (nothing vs an offer worth exactly 0) go to doing nothing, as the greedy policy's.
    winners = np.argmax(values, axis=0)
    chosen = names[int(winners[0])]  # the first draw decides; all of them estimate the odds
    share = np.bincount(winners, minlength=len(names)) / DRAWS
    posterior = {offer: (1 + c.converted) / (2 + c.decisions) for offer, c in counts.items()}
    probabilities = {offer: float(share[i]) for i, offer in enumerate(names)}
    return chosen, probabilities, posterior


class OutcomeFollower:
    """Every worker's :class:`OfferStats`: the whole `outcomes` topic, then what it gets next.
    A failure is logged and retried, never fatal; until caught up, sampling uses what is read."""

    def __init__(self, kafka: KafkaSettings, window_ms: int) -> None:
        self.kafka = kafka
        self.stats = OfferStats(window_ms=window_ms)

    def apply(self, key: bytes | None, value: bytes | None) -> None:
        if key is None or value is None:
            return
        try:
            self.stats.add(Outcome.from_json(value))
        except (ValueError, KeyError, TypeError) as exc:
            log.warning("unreadable outcome %s skipped: %s", key[:40], exc)

    async def run(self) -> None:
        from stream.topics import follow_topic

        while True:
            try:
                await follow_topic(self.kafka, self.kafka.outcomes_topic, self.apply)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("outcomes reader (Thompson sampling) failed; retrying in 5 s")
                await asyncio.sleep(5)
