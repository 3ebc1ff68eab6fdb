"""`promo coupons` and `promo preferences`: what marketers and consent flows publish."""

from __future__ import annotations

from pathlib import Path

import click

from stream.cli.common import Context, pass_context


@click.group()
def coupons() -> None:
    """Publish, list and retire coupon campaigns (the compacted `coupons` topic).

    \b
    A campaigns file is a JSON list (or JSON lines) of objects:
      {"coupon_id": "spring-10", "value": 10.0, "budget": 5000.0,
       "valid_from": "2026-03-01T00:00:00Z", "valid_to": 1775000000000,
       "min_spend": 30.0, "items": ["sku-1"], "categories": ["snacks"],
       "max_exposures": 1000}
    value, budget and min_spend are money; valid_from / valid_to are epoch milliseconds
    or ISO-8601 text (no zone: UTC), valid_to defaulting to no end (and no pacing); no items
    and no categories means any purchase. Workers pick changes up within a second.
    """


@coupons.command("publish")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--dry-run", is_flag=True, help="Check the file; publish nothing.")
@pass_context
def coupons_publish(context: Context, file: Path, dry_run: bool) -> None:
    """Check every campaign in FILE, then publish them all (or none)."""
    from stream import admin

    campaigns = admin.load_campaigns(file)
    if dry_run:
        click.echo(f"{len(campaigns)} campaigns in {file} are valid; nothing published")
        return
    admin.publish_campaigns(context.settings.kafka, campaigns)
    click.echo(f"published {len(campaigns)} campaigns to {context.settings.kafka.coupons_topic}"
               f": {', '.join(c.coupon_id for c in campaigns)}")


@coupons.command("list")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per campaign.")
@pass_context
def coupons_list(context: Context, as_json: bool) -> None:
    """The campaigns the workers serve from, with their windows."""
    import time

    import orjson

    from stream import admin

    campaigns = admin.read_campaigns(context.settings.kafka)
    now_ms = int(time.time() * 1000)
    for coupon in sorted(campaigns.values(), key=lambda c: c.coupon_id):
        if as_json:
            click.echo(orjson.dumps({"coupon_id": coupon.coupon_id}
                                    | orjson.loads(coupon.to_json())).decode())
            continue
        targets = (f"{len(coupon.items)} items, {len(coupon.categories)} categories"
                   if coupon.items or coupon.categories else "any purchase")
        click.echo(f"{coupon.coupon_id:<24} value {coupon.value:>8.2f}  budget "
                   f"{coupon.budget:>10.2f}  {admin.describe_window(coupon, now_ms)}  "
                   f"{targets}")
    if not campaigns and not as_json:
        click.echo(f"no campaigns in {context.settings.kafka.coupons_topic}")


@coupons.command("retire")
@click.argument("coupon_ids", nargs=-1, required=True)
@pass_context
def coupons_retire(context: Context, coupon_ids: tuple[str, ...]) -> None:
    """End campaigns now: no coupon of theirs is issued once workers see it (a second)."""
    from stream import admin

    unknown = admin.retire_campaigns(context.settings.kafka, list(coupon_ids))
    click.echo(f"retired {', '.join(coupon_ids)}"
               + (f" ({', '.join(unknown)} were not in the catalog)" if unknown else ""))


@click.group()
def preferences() -> None:
    """Publish users' consent and time zones (the compacted `user-preferences` topic)."""


@preferences.command("publish")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--dry-run", is_flag=True, help="Check the file; publish nothing.")
@pass_context
def preferences_publish(context: Context, file: Path, dry_run: bool) -> None:
    """Check every record in FILE, then publish them all (or none).

    \b
    FILE: JSON list, JSON lines or CSV (header user_id,push_opt_in,coupon_opt_in,timezone):
      {"user_id": "u42", "push_opt_in": false, "coupon_opt_in": true,
       "timezone": "Europe/Berlin"}
    A flag left out (or empty in a CSV) is not stated: that user gets the configured
    default (policy.default_push_opt_in / default_coupon_opt_in), like a user with no
    record. Stated flags always win.
    """
    from stream import admin

    found = admin.load_preferences(file)
    if dry_run:
        click.echo(f"{len(found)} preferences in {file} are valid; nothing published")
        return
    admin.publish_preferences(context.settings.kafka, found)
    click.echo(f"published {len(found)} preferences to "
               f"{context.settings.kafka.preferences_topic}")


COMMANDS = [coupons, preferences]
