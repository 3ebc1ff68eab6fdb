"""Placeholder until the encoder lands: `promo train` and `promo evaluate`."""

import click


@click.command()
def train() -> None:
    """Train the user encoder (not built yet)."""
    raise click.ClickException("promo train is not built yet")


@click.command()
def evaluate() -> None:
    """Evaluate a checkpoint (not built yet)."""
    raise click.ClickException("promo evaluate is not built yet")
