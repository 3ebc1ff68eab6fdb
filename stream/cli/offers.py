"""`promo offers USER_ID`: ask a running worker's pull API what it would offer a user (and
claim it with ``--claim``), with the client in :mod:`stream.client`."""

from __future__ import annotations

import click
import orjson

from stream.cli.common import Context, pass_context


@click.command("offers")
@click.argument("user_id")
@click.option("--url", default=None,
              help="Any worker's API [default: api.advertised_url, else http(s)://api.host:"
                   "api.port].")
@click.option("--token", envvar="PROMO_API_TOKEN", default=None, show_envvar=True,
              help="Bearer token [default: the first of api.tokens / api.tokens_file].")
@click.option("--limit", type=click.IntRange(1, 50), default=None,
              help="Items to recommend [default: policy.push_items].")
@click.option("--claim", is_flag=True,
              help="Claim the offer: spend budget and caps and publish the decision.")
@click.option("--idempotency-key", default=None,
              help="With --claim: the key to claim under (repeat it to retry safely) "
                   "[default: a new UUID].")
@click.option("--vector", "want_vector", is_flag=True, help="Print the user's vector instead.")
@pass_context
def offers(context: Context, user_id: str, url: str | None, token: str | None,
           limit: int | None, claim: bool, idempotency_key: str | None,
           want_vector: bool) -> None:
    """What the policy would offer USER_ID now, as JSON (a preview: nothing is spent).

    \b
    Examples:
      PROMO_API_TOKEN=secret promo offers user-42
      promo offers user-42 --claim --idempotency-key order-1234
    """
    import httpx

    from stream.client import ApiError, OffersClient

    api = context.settings.api
    if not token and (api.tokens or api.tokens_file):
        token = sorted(api.accepted_tokens())[0]
    if not token:
        raise click.ClickException("no API token: pass --token or set PROMO_API_TOKEN")
    verify: str | bool = api.tls_cafile or True
    with OffersClient(url or api.url(), token, verify=verify) as client:
        try:
            if want_vector:
                answer = client.vector(user_id)
            elif claim:
                answer = client.claim(user_id, idempotency_key)
            else:
                answer = client.offers(user_id, limit)
        except ApiError as exc:
            raise click.ClickException(str(exc)) from exc
        except httpx.HTTPError as exc:
            raise click.ClickException(f"cannot reach {url or api.url()}: {exc}") from exc
    click.echo(orjson.dumps(answer, option=orjson.OPT_INDENT_2).decode())


COMMANDS = [offers]
