"""Offline decision simulator (`promo simulate`): decisions judged by what users really did next.

The data are cut in time. The encoder learns from the part before the cut (or a given checkpoint
is used: it must not have seen the part after it), every user's state is warmed up on that part,
and the rest is replayed in time order through the worker's own code: ``state.apply_events``,
``policy.event_triggers`` / ``policy.cart_abandoned`` and ``policy.decide``. At every decision
moment each policy decides, and a decision is a *hit* when the user converted on an offered
item (a pushed item, a coupon's target item or category) within their next ``horizon`` events.
Conversions are purchases; in a log without purchases, any event.

The policies differ only in what ranks items, so caps, quiet hours, budgets, pacing, exposure
caps and propensity tiers are the same code for all:

- ``ours``: the encoder, as the worker runs it;
- ``random``: random item scores;
- ``popularity``: items ranked by conversions before the cut;
- ``holdout``: ours' decisions at the same moments (same caps, same budget reservations), sent
  to nobody and costing nothing: how often users bought what we would have offered anyway;
- ``ours_without_propensity_gate``: ours with the "likely to buy anyway" tiers switched off, to
  show where the gate moves coupons;
- ``ours_without_repeat_prior``: ours ranking pushes by the encoder alone
  (``push_repeat_weight`` 0), to show what the prior from each user's own history adds;
- ``repeat``: no model at all: the user's own recent items, most frequent first, then
  popularity. The classic strong baseline for baskets that repeat (groceries): it says how much
  the encoder adds beyond "what you bought before".

A logged dataset holds no coupons: every purchase in it happened without one. So offline, ours
and the holdout see the same real future, their hit rates are equal, the incremental purchases
are zero and the cost per incremental purchase is undefined (null): every discount granted
offline went to a purchase that happened anyway. The simulator measures targeting (hit rate),
spend, and whether caps and budgets hold; uplift needs the live holdout arm (decisions with
``arm: holdout``), which the worker records for exactly that.

The modules: ``config`` (the policies and the settings), ``moments`` (the time cut, the
generated campaigns, the decision moments), ``baselines`` (the other item rankings), ``judge``
(one policy over the moments, hits, budgets and caps), ``calibration`` (the propensity score
against what happened), ``run`` (training before the cut, choosing the repeat weight, the whole
simulation) and ``report`` (the summaries, the printed table and the figure).
"""

from stream.offline.config import SimulationConfig
from stream.offline.moments import time_split
from stream.offline.report import report_png, summary_lines
from stream.offline.run import simulate, train_before_cut

__all__ = ["SimulationConfig", "report_png", "simulate", "summary_lines", "time_split",
           "train_before_cut"]
