"""`promo shop-sim`: rehearse a campaign against a simulated shop with a known true lift."""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from stream.cli.common import (
    Context,
    DataChoice,
    bootstrap_option,
    data_options,
    load_data,
    pass_context,
    progress_option,
    with_overrides,
)

if TYPE_CHECKING:
    from stream.policy import ServingModel
from stream.policy import ServingModel


@click.command("shop-sim")
@data_options(from_kafka=False)
@click.option("--users", type=click.IntRange(min=1), default=10_000,
              help="Simulated users (real users resampled under new ids).")
@click.option("--days", type=click.FloatRange(min=0.5), default=14.0,
              help="Days of shop time to simulate.")
@click.option("--speed", type=click.FloatRange(min=1), default=20_000.0,
              help="Shop seconds per wall-clock second (20,000: a day in about 4 s).")
@click.option("--truth-users", type=click.IntRange(min=1), default=None,
              help="Users of each in-process world the ground truth is measured on "
                   "[default: 2 x --users].")
@click.option("--offline", is_flag=True,
              help="No broker: only measure the ground truth in-process (rehearse a campaign "
                   "before launching it).")
@click.option("--coupons", "coupons_file", type=click.Path(exists=True, dir_okay=False,
                                                           path_type=Path),
              default=None, help="Campaigns as for `promo coupons publish` [default: the "
                                 "coupons topic].")
@click.option("--checkpoint", default=None,
              help="Encoder the worker serves, for the ground truth [default: worker.checkpoint].")
@click.option("--coupon-uplift", type=click.FloatRange(0, 1), default=0.25,
              help="A persuadable's chance that a coupon brings an extra order.")
@click.option("--push-uplift", type=click.FloatRange(0, 1), default=0.10,
              help="The same for a push, before fatigue.")
@click.option("--put-off-share", type=click.FloatRange(0, 1), default=0.10,
              help="Share of users a push puts off (they may skip their next order).")
@click.option("--put-off-rate", type=click.FloatRange(0, 1), default=0.30,
              help="Their chance to skip it after a push.")
@click.option("--fatigue", type=click.FloatRange(0, 1), default=0.5,
              help="Each push of the last week multiplies a push's effect by this.")
@click.option("--seed", type=int, default=0)
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path),
              default=Path("shop-sim.json"), help="Where the ground truth (and the live "
                                                  "run's counts) are written.")
@bootstrap_option
@progress_option
@pass_context
def shop_sim(context: Context, data: DataChoice, users: int, days: float, speed: float,
             truth_users: int | None, offline: bool, coupons_file: Path | None,
             checkpoint: str | None, coupon_uplift: float, push_uplift: float,
             put_off_share: float, put_off_rate: float, fatigue: float, seed: int, out: Path,
             bootstrap_servers: str | None, progress: bool) -> None:
    """Rehearse campaigns on a simulated shop whose true response is known.

    Users copy real users' rhythms (default: the installed Instacart sample): the gaps between
    their orders, their baskets, browsing in between. A coupon or push sent to them may bring
    an extra order (persuadables), not (sure things, lost causes), or put them off (pushes to
    do-not-disturb users); pushes tire. Live (the default), the shop produces its events into
    `events` on an accelerated clock, answers the worker's `decisions`, then closes every
    attribution window; `promo report uplift` then estimates what --out holds as the truth:
    each campaign's conversion rate with every user treated and with none, measured by running
    the same shop through the worker's own pipeline in-process. Run the worker with
    time-based policy gates off (caps, minimum intervals, quiet hours, propensity tiers: they
    run on the worker's clock, the shop on its own); --out lists the settings used.
    """
    import asyncio

    from tqdm import tqdm

    from stream import shop
    from stream.contracts import DAY_MS
    from stream.outcomes import Rules
    from stream.topics import ensure_topics

    settings = with_overrides(context.settings, kafka={"bootstrap_servers": bootstrap_servers})
    if data.dataset is None and data.interactions is None:
        data = dataclasses.replace(data, dataset="instacart")
    name, rows, source = load_data(settings, data, progress=progress)
    try:
        templates = shop.histories(rows)
    except ValueError as exc:
        raise click.ClickException(f"{name}: {exc}") from exc
    effects = shop.Effects(coupon_uplift=coupon_uplift, push_uplift=push_uplift,
                           put_off_share=put_off_share, put_off_rate=put_off_rate,
                           fatigue=fatigue)
    rules = Rules.from_settings(settings.attribution)
    # Shop time ends before now, with room for every window and its grace: the contract
    # refuses events from the future.
    span_ms = int(days * DAY_MS) + rules.window_ms + rules.grace_ms + DAY_MS
    start_ms = (int(time.time() * 1000) - span_ms) // DAY_MS * DAY_MS
    from stream import admin

    if coupons_file is not None:
        try:
            coupons = admin.load_campaigns(coupons_file)
        except ValueError as exc:
            raise click.ClickException(f"{coupons_file}: {exc}") from exc
    elif offline:
        coupons = []
    else:
        coupons = list(admin.read_campaigns(settings.kafka).values())
    report: dict[str, Any] = {
        "source": source, "templates": len(templates), "users": users, "days": days,
        "seed": seed, "effects": dataclasses.asdict(effects),
        "coupons": [c.coupon_id for c in coupons], "window_ms": rules.window_ms,
        "policy": dataclasses.asdict(settings.policy)}
    if not offline:
        live_shop = shop.Shop(templates, users=users, start_ms=start_ms, effects=effects,
                              seed=seed)
        report["segments"] = live_shop.segments()
        asyncio.run(ensure_topics(settings.kafka))
        with tqdm(total=int(days * 24), unit="shop h", desc="live shop",
                  disable=not progress) as bar:
            def tick(now_ms: float) -> None:
                bar.update(int((now_ms - start_ms) / 3_600_000) - bar.n)

            live = asyncio.run(shop.run_live(settings, live_shop, start_ms=start_ms, days=days,
                                             speed=speed, progress=tick))
        arms: dict[str, int] = {}
        for arm, _ in live.decisions.values():
            arms[arm] = arms.get(arm, 0) + 1
        report["live"] = {"events": live.events, "decisions": len(live.decisions),
                          "decisions_by_arm": arms, "outcomes": len(live.outcomes),
                          "missing_outcomes": live.missing_outcomes,
                          **dataclasses.asdict(live_shop.stats)}
        click.echo(f"live: {live.events:,} events, {len(live.decisions):,} decisions, "
                   f"{len(live.outcomes):,} outcomes ({live.missing_outcomes} missing)")
    encoder = _encoder(checkpoint or settings.worker.checkpoint or None)
    setup = shop.Setup(templates=templates, users=truth_users or 2 * users, days=days,
                       start_ms=start_ms, policy=settings.policy, coupons=coupons,
                       encoder=encoder, partitions=settings.kafka.partitions, rules=rules,
                       effects=effects, seed=seed + 1)
    with tqdm(total=int(days * 24) * 2, unit="shop h", desc="ground truth (2 worlds)",
              disable=not progress) as bar:
        report["truth"] = shop.ground_truth(setup, progress=lambda now_ms: bar.update(1))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    for campaign, row in report["truth"]["campaigns"].items():
        lift = row["true_lift"]
        click.echo(f"{campaign:>20}: treated {row['treatment']['rate']:.2%}, untreated "
                   f"{row['holdout']['rate']:.2%}, true lift "
                   + ("n/a" if lift is None else f"{lift * 100:+.2f} points"))
    click.echo(f"wrote {out}")


def _encoder(path: str | None) -> ServingModel | None:
    if not path:
        return None
    from encoder.checkpoint import CheckpointError
    from encoder.inference import Encoder

    try:
        return Encoder.load(Path(path))
    except (CheckpointError, OSError) as exc:
        raise click.ClickException(f"cannot load checkpoint {path}: {exc}") from exc


COMMANDS = [shop_sim]
