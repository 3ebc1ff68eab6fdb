"""Every Prometheus metric promo-stream exports, defined once.

Names follow Prometheus conventions: ``promo_`` prefix, base units (seconds, bytes), ``_total``
on counters (prometheus_client appends it). Labels take only bounded values: event types,
rejection reasons, actions, arms, reason codes, partitions, and campaigns (the catalog's
coupon ids: a marketer's list, capped at ``MAX_CAMPAIGN_SERIES`` series). Never a user or item
id.

Metrics live on a :class:`Metrics` object with its own registry, so tests and several workers in
one process do not share counters by accident. The worker does not serve them itself: its
exporter process does (:mod:`stream.exporter`), adding the two gauges it measures from outside
the worker (:data:`EXPORTER_GAUGES`), so they stay true while the worker is stuck.
"""

from __future__ import annotations

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    disable_created_metrics,
)

from stream.contracts import EVENT_TYPES, Action, Arm, Outcome, Reason, TriggerKind

# `*_created` series double the exposition for no use on dashboards or alerts.
disable_created_metrics()  # type: ignore[no-untyped-call]

API_ENDPOINTS = ("offers", "claim", "vector")  # the ones a dashboard shows from the start
ACTIONS = tuple(Action)
ARMS = tuple(Arm)
TRIGGERS = (TriggerKind.CART_ADD, TriggerKind.REPEAT_VIEWS, TriggerKind.CART_ABANDONED,
            TriggerKind.ON_SITE)
# Micro-batches and encoder calls take milliseconds to a few seconds.
BATCH_SECONDS_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
BATCH_SIZE_BUCKETS = (1, 10, 50, 100, 250, 500, 1000, 2000, 5000, 10000)
# Event time to decision published: the product promises seconds.
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 30.0, 60.0)
# A pull API answer is due in milliseconds (a cart page waits for it).
API_SECONDS_BUCKETS = (0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.1, 0.25,
                       0.5, 1.0, 2.5)
STATE_BYTES_BUCKETS = (64, 128, 256, 384, 512, 640, 768, 896, 1024, 1536, 2048)
# A shop runs a handful of campaigns at a time; past this many, only the ones with the least
# budget left get a series (what the budget alert and panel look at).
MAX_CAMPAIGN_SERIES = 100

#: Gauges the exporter process measures (name -> help, labels): see stream/exporter.py.
EXPORTER_GAUGES: dict[str, tuple[str, list[str]]] = {
    "promo_stream_consumer_lag_records": (
        "Records of `events` (and its repartition topic) past the group's committed offset, "
        "per partition this worker owns; measured outside the worker from the end offsets "
        "every 2 s, so it keeps growing while the worker is stuck.", ["partition"]),
    "promo_worker_heartbeat_age_seconds": (
        "Seconds since the worker's event loop last wrote its metrics (about 1 when healthy; "
        "growing: the worker is stuck).", []),
}


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = r = registry or CollectorRegistry()
        # Input
        self.events_consumed = Counter(
            "promo_stream_events_consumed", "Valid events consumed, by event type.",
            ["type"], registry=r)
        self.records_rejected = Counter(
            "promo_stream_records_rejected",
            "Records rejected and sent to the dead-letter topic, by reason.", ["reason"],
            registry=r)
        self.records_redelivered = Counter(
            "promo_stream_records_redelivered",
            "Records skipped because their user's state already holds them (redelivered "
            "after a crash or a rebalance, at-least-once).", registry=r)
        self.records_repartitioned = Counter(
            "promo_stream_records_repartitioned",
            "Valid events a producer put on another partition than murmur2(user_id) picks, "
            "forwarded to the repartition topic (use a murmur2 partitioner to avoid the hop).",
            registry=r)
        self.preferences_stored = Counter(
            "promo_stream_preferences_stored",
            "Preferences records (consent, time zone) stored, or forgotten by a tombstone; "
            "rejected ones count under promo_stream_records_rejected_total.", registry=r)
        # Micro-batches
        self.batch_size = Histogram(
            "promo_stream_batch_size_records", "Records per micro-batch.",
            buckets=BATCH_SIZE_BUCKETS, registry=r)
        self.batch_duration = Histogram(
            "promo_stream_batch_duration_seconds", "Wall time to process one micro-batch.",
            buckets=BATCH_SECONDS_BUCKETS, registry=r)
        # Encoder
        self.encoder_batch_size = Histogram(
            "promo_encoder_batch_size_users", "Users per batched encoder call.",
            buckets=BATCH_SIZE_BUCKETS, registry=r)
        self.encoder_duration = Histogram(
            "promo_encoder_inference_seconds", "Wall time of one batched encoder call.",
            buckets=BATCH_SECONDS_BUCKETS, registry=r)
        self.vector_refreshes = Counter(
            "promo_encoder_vector_refreshes", "User vectors recomputed.", registry=r)
        self.encoder_failures = Counter(
            "promo_encoder_failures",
            "Checkpoint loads (stage=load: the previous model, if any, keeps serving; "
            "stage=uplift_load: an uplift checkpoint, the previous one or the propensity tiers "
            "keep deciding) or batched encoder calls (stage=inference: that batch decides "
            "without fresh vectors) that failed.", ["stage"], registry=r)
        self.model_loaded = Gauge(
            "promo_encoder_model_loaded", "1 if a model checkpoint is loaded and serving.",
            registry=r)
        self.model_info = Info(
            "promo_encoder_model", "The model checkpoint serving decisions.", registry=r)
        # Decisions
        self.decisions = Counter(
            "promo_decisions_published", "Decisions published, by action and arm.",
            ["action", "arm"], registry=r)
        self.offers = Counter(
            "promo_offers_published",
            "Decisions published by offer (none, push, coupon_full, coupon_half), arm, and "
            "chosen: greedy (what the policy prefers) or explored (at random, logged "
            "exploration).", ["offer", "arm", "chosen"], registry=r)
        self.triggers = Counter(
            "promo_decisions_triggers", "Decision triggers fired, by kind.", ["kind"],
            registry=r)
        self.decision_latency = Histogram(
            "promo_decision_latency_seconds",
            "Event time of the triggering event to the decision being published.",
            buckets=LATENCY_BUCKETS, registry=r)
        self.coupon_budget_remaining = Gauge(
            "promo_coupon_budget_remaining_ratio",
            "Share of a valid campaign's budget this worker's partitions have not reserved "
            "(1 = untouched, 0 = spent), from the pacing state, refreshed every 5 s.",
            ["campaign"], registry=r)
        # State
        self.users_in_state = Gauge(
            "promo_state_users",
            "Users with state in this worker's active partitions (counted from the table "
            "when partitions are assigned, then one up per new user).", registry=r)
        self.state_bytes = Histogram(
            "promo_state_record_bytes", "Encoded size of user state records written.",
            buckets=STATE_BYTES_BUCKETS, registry=r)
        # Worker (whether it runs at all is Prometheus's own `up` of the exporter)
        # Outcomes (stream/outcomes.py): what decisions changed
        self.outcomes = Counter(
            "promo_outcomes",
            "Decisions whose attribution window closed, by campaign (coupon id, push template "
            "or none), action, arm and whether the user converted within the window. Evicted "
            "windows count in promo_outcomes_evicted_total instead.",
            ["campaign", "action", "arm", "converted"], registry=r)
        self.outcomes_value = Counter(
            "promo_outcomes_value",
            "Worth of the conversions attributed to decisions (event value, else price x "
            "quantity), by campaign and arm.", ["campaign", "arm"], registry=r)
        self.redemptions = Counter(
            "promo_outcomes_redeemed",
            "Conversions that named the decision's coupon, and the money off they granted "
            "(promo_outcomes_redeemed_discount_total).", ["campaign", "arm"], registry=r)
        self.redeemed_discount = Counter(
            "promo_outcomes_redeemed_discount",
            "Money off granted by redeemed coupons, by campaign and arm.", ["campaign", "arm"],
            registry=r)
        self.outcomes_evicted = Counter(
            "promo_outcomes_evicted",
            "Attribution windows closed early because their user had too many open "
            "(attribution.max_pending); they count in no conversion rate.", ["action", "arm"],
            registry=r)
        self.conversions_unattributed = Counter(
            "promo_outcomes_unattributed_conversions",
            "Conversions of users with no open attribution window.", registry=r)
        self.windows_open = Gauge(
            "promo_outcomes_windows_open",
            "Attribution windows open on this worker's partitions.", registry=r)
        self.uplift_decisions = Gauge(
            "promo_uplift_decisions",
            "Closed, not evicted decisions per campaign and arm on this worker's partitions, "
            "from the outcome-counts table (so it survives restarts and moves with "
            "partitions): the guardrail alert and the lift panels sum it over workers.",
            ["campaign", "arm"], registry=r)
        self.uplift_conversions = Gauge(
            "promo_uplift_conversions",
            "Of promo_uplift_decisions, those whose user converted in the window.",
            ["campaign", "arm"], registry=r)
        self._campaigns: set[str] = set()
        # The pull API (stream/api.py); `endpoint` is one of api.ENDPOINTS' values or "other".
        self.api_requests = Counter(
            "promo_api_requests", "Pull API requests answered, by endpoint and HTTP status.",
            ["endpoint", "status"], registry=r)
        self.api_request_seconds = Histogram(
            "promo_api_request_duration_seconds",
            "Pull API time from request to answer (forwarding included), by endpoint.",
            ["endpoint"], buckets=API_SECONDS_BUCKETS, registry=r)
        self.api_forwarded = Counter(
            "promo_api_forwarded",
            "Pull API requests forwarded to the worker that owns the user, by endpoint.",
            ["endpoint"], registry=r)
        self.worker_ready = Gauge(
            "promo_worker_ready",
            "1 once the worker owns its partitions, its tables have recovered and the "
            "preferences table has caught up (consent enforceable); 0 during a rebalance.",
            registry=r)
        # Labels are not initialised when declared; pre-create them so dashboards and alerts
        # see zeros instead of missing series.
        for event_type in EVENT_TYPES:
            self.events_consumed.labels(type=event_type)
        for reason in Reason:
            self.records_rejected.labels(reason=reason.value)
        for action in ACTIONS:
            for arm in ARMS:
                self.decisions.labels(action=action, arm=arm)
        for kind in TRIGGERS:
            self.triggers.labels(kind=kind)
        for endpoint in API_ENDPOINTS:
            self.api_requests.labels(endpoint=endpoint, status="200")
            self.api_request_seconds.labels(endpoint=endpoint)
            self.api_forwarded.labels(endpoint=endpoint)
        for stage in ("load", "uplift_load", "inference"):
            self.encoder_failures.labels(stage=stage)
        for action in ACTIONS:
            for arm in ARMS:
                self.outcomes_evicted.labels(action=action, arm=arm)

    def campaign_label(self, campaign: str) -> str:
        """``campaign`` itself for the first MAX_CAMPAIGN_SERIES campaigns seen, ``other``
        after that: a shop that mints a coupon id per user must not explode the series."""
        if campaign in self._campaigns or len(self._campaigns) < MAX_CAMPAIGN_SERIES:
            self._campaigns.add(campaign)
            return campaign
        return "other"

    def count_outcome(self, outcome: Outcome) -> None:
        if outcome.evicted:
            self.outcomes_evicted.labels(action=outcome.action, arm=outcome.arm).inc()
            return
        campaign = self.campaign_label(outcome.campaign)
        self.outcomes.labels(campaign=campaign, action=outcome.action, arm=outcome.arm,
                             converted="true" if outcome.converted else "false").inc()
        if outcome.value:
            self.outcomes_value.labels(campaign=campaign, arm=outcome.arm).inc(outcome.value)
        if outcome.redeemed:
            self.redemptions.labels(campaign=campaign, arm=outcome.arm).inc()
            self.redeemed_discount.labels(campaign=campaign, arm=outcome.arm).inc(
                outcome.discount)
