"""What the offline simulator runs: the policies it compares and its settings."""

from __future__ import annotations

from dataclasses import dataclass, field

from stream.config import PolicyConfig

POLICIES = ("ours", "random", "popularity", "repeat", "holdout",
            "ours_without_propensity_gate", "ours_without_repeat_prior")


@dataclass(frozen=True)
class SimulationConfig:
    train_fraction: float = 0.8  # events before this quantile of time train and warm up
    horizon: int = 30  # a decision hits if the user converts on an offered item this soon
    campaigns: int = 8  # generated campaigns, when no catalog is given
    items_per_campaign: int = 3
    seed: int = 0
    quiet_hours: bool = True  # off for logs whose times are synthesised from order alone
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    # Choose policy.push_repeat_weight on a validation period before the cut (else: as set).
    tune_repeat_weight: bool = True
    repeat_weights: tuple[float, ...] = (0.0, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0)
    validation_fraction: float = 0.125  # of the events before the cut
