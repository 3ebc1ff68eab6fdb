"""Interaction data: the datasets in ../shared/datasets and any CSV, as typed, timed events.

Every loader returns :class:`Interaction`s sorted by (event time, file order), so each user's
events are in that user's order. The streaming replay produces exactly these as Kafka events;
training turns them into per-user sequences (:func:`user_sequences`) and splits them
leave-one-out (:func:`leave_one_out`).

How each dataset becomes events (real data, faithfully converted):

- ``games`` (SASRec's Video.txt) and ``beauty`` (S3-Rec's Beauty): interactions in each user's
  order, no timestamps. Event time is synthesised: a user's k-th interaction happens k minutes
  after a fixed base time, so order is kept exactly and users interleave. All are ``purchase``
  (they are reviews of bought products).
- ``instacart``: every row is an ``add_to_cart`` at the order's time (base date + cumulative
  days_since_prior_order, at order_hour_of_day) plus ``add_to_cart_order`` seconds; when the
  order completes (a minute after its last cart add) each of its products is a ``purchase``.
- ``rees46``: view / cart (-> ``add_to_cart``) / purchase at their UTC times, with price,
  category (category_code, else category_id) and session.
- ``ml-100k``: one event per rating at its time: ``purchase`` if the rating is >= 4 else
  ``view``. This labelling is derived, not observed; the category is the movie's first genre.
"""

from __future__ import annotations

import csv
import gzip
import io
import os
from collections import defaultdict
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

EVENT_TYPES: tuple[str, ...] = ("view", "click", "add_to_cart", "purchase")
TYPE_SYNONYMS = {
    "view": "view", "views": "view", "pageview": "view", "page_view": "view",
    "detail": "view", "impression": "view",
    "click": "click", "clicks": "click",
    "add_to_cart": "add_to_cart", "addtocart": "add_to_cart", "cart": "add_to_cart",
    "add-to-cart": "add_to_cart", "basket": "add_to_cart",
    "purchase": "purchase", "buy": "purchase", "order": "purchase", "transaction": "purchase",
    "checkout": "purchase", "sale": "purchase",
}
#: 2017-01-01T00:00:00Z: the base of synthesised and relative timestamps.
BASE_MS = 1_483_228_800_000
MINUTE_MS = 60_000
HOUR_MS = 3_600_000
DAY_MS = 86_400_000


@dataclass(frozen=True, slots=True)
class Interaction:
    user_id: str
    item_id: str
    event_type: str  # one of EVENT_TYPES
    ts_ms: int  # event time, epoch milliseconds (synthesised where a dataset only has order)
    price: float | None = None
    quantity: int | None = None
    category: str | None = None
    session_id: str | None = None


class DataError(ValueError):
    """A dataset or CSV cannot be read as interactions; the message says where and why."""


def default_datasets_dir() -> Path:
    """``$PROMO_DATASETS_DIR``, else ``../shared/datasets`` beside the repository."""
    configured = os.environ.get("PROMO_DATASETS_DIR")
    if configured:
        return Path(configured)
    return Path(__file__).resolve().parents[1].parent / "shared" / "datasets"


DATASET_NAMES: tuple[str, ...] = ("games", "beauty", "ml-100k", "instacart", "rees46")
_ALIASES = {
    "video": "games", "sasrec-video": "games", "amazon-beauty-s3rec": "beauty",
    "instacart-sample": "instacart", "rees46-sample": "rees46", "ml100k": "ml-100k",
}


def canonical_name(name: str) -> str:
    key = name.strip().lower()
    key = _ALIASES.get(key, key)
    if key not in DATASET_NAMES:
        raise DataError(f"unknown dataset {name!r}; known: {', '.join(DATASET_NAMES)} "
                        f"(aliases: {', '.join(sorted(_ALIASES))})")
    return key


def load_dataset(name: str, datasets_dir: Path | None = None) -> list[Interaction]:
    """Load a named dataset from ``datasets_dir`` (default :func:`default_datasets_dir`)."""
    root = Path(datasets_dir) if datasets_dir else default_datasets_dir()
    key = canonical_name(name)
    paths = {
        "games": root / "sasrec" / "Video.txt",
        "beauty": root / "amazon-beauty-s3rec" / "Beauty.txt",
        "ml-100k": root / "ml-100k" / "ml-100k.inter",
        "instacart": root / "instacart-sample" / "df_sample.csv.gz",
        "rees46": root / "rees46-sample" / "2019-Oct-first1000.csv",
    }
    path = paths[key]
    if not path.exists():
        raise DataError(f"dataset {key!r} not found at {path} "
                        "(set PROMO_DATASETS_DIR or --datasets-dir)")
    if key == "games":
        rows = _sasrec_pairs(path)
    elif key == "beauty":
        rows = _sasrec_lines(path)
    elif key == "ml-100k":
        rows = _movielens(path, path.with_suffix(".item"))
    elif key == "instacart":
        rows = _instacart(path)
    else:
        rows = _rees46(path)
    return _time_ordered(rows)


def _time_ordered(rows: Iterable[Interaction]) -> list[Interaction]:
    # sorted() is stable: equal times keep file order, so a user's order survives.
    return sorted(rows, key=lambda it: it.ts_ms)


def _ordered_sequences(sequences: Iterable[tuple[str, list[str]]]) -> Iterator[Interaction]:
    for user, items in sequences:
        for k, item in enumerate(items):
            yield Interaction(user, item, "purchase", BASE_MS + k * MINUTE_MS)


def _sasrec_pairs(path: Path) -> Iterator[Interaction]:
    """``user item`` per line, each user's lines together and in time order."""
    by_user: dict[str, list[str]] = defaultdict(list)
    with open(path) as f:
        for line_no, line in enumerate(f, 1):
            parts = line.split()
            if not parts:
                continue
            if len(parts) != 2:
                raise DataError(f"{path}:{line_no}: expected 'user item', got {line.strip()!r}")
            by_user[parts[0]].append(parts[1])
    return _ordered_sequences(by_user.items())


def _sasrec_lines(path: Path) -> Iterator[Interaction]:
    """``user item1 item2 ...`` per line, items in time order."""
    def sequences() -> Iterator[tuple[str, list[str]]]:
        with open(path) as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 2:
                    yield parts[0], parts[1:]
    return _ordered_sequences(sequences())


def _movielens(inter: Path, items: Path) -> Iterator[Interaction]:
    genres: dict[str, str] = {}
    if items.exists():
        with open(items, encoding="utf-8", errors="replace") as f:
            reader = csv.reader(f, delimiter="\t")
            header = next(reader)
            col = {name.split(":")[0]: i for i, name in enumerate(header)}
            for row in reader:
                if len(row) > col.get("class", 99) and row[col["class"]].strip():
                    genres[row[col["item_id"]]] = row[col["class"]].split()[0]
    with open(inter, encoding="utf-8") as f:
        reader = csv.reader(f, delimiter="\t")
        header = next(reader)
        col = {name.split(":")[0]: i for i, name in enumerate(header)}
        for row in reader:
            item = row[col["item_id"]]
            rating = float(row[col["rating"]])
            yield Interaction(row[col["user_id"]], item, "purchase" if rating >= 4 else "view",
                              int(float(row[col["timestamp"]]) * 1000),
                              category=genres.get(item))


def _instacart(path: Path) -> Iterator[Interaction]:
    with gzip.open(path, "rt", newline="") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
    # Orders per user in order_number order; a user's clock starts at BASE_MS.
    orders: dict[tuple[str, int], list[dict[str, str]]] = defaultdict(list)
    for row in rows:
        orders[(row["user_id"], int(row["order_number"]))].append(row)
    clock: dict[str, int] = {}
    for user, number in sorted(orders, key=lambda k: (int(k[0]), k[1])):
        lines = sorted(orders[(user, number)], key=lambda r: float(r["add_to_cart_order"] or 0))
        first = lines[0]
        days = float(first["days_since_prior_order"] or 0)
        day_start = clock.get(user, BASE_MS) + int(days) * DAY_MS
        day_start -= day_start % DAY_MS  # back to midnight of that day
        clock[user] = day_start
        order_ms = day_start + int(first["order_hour_of_day"]) * HOUR_MS
        session = f"order-{first['order_id']}"
        last_add = order_ms
        for line in lines:
            last_add = order_ms + int(float(line["add_to_cart_order"] or 0)) * 1000
            yield Interaction(user, line["product_id"], "add_to_cart", last_add, quantity=1,
                              session_id=session)
        for line in lines:
            yield Interaction(user, line["product_id"], "purchase", last_add + MINUTE_MS,
                              quantity=1, session_id=session)


def _rees46(path: Path) -> Iterator[Interaction]:
    with open(path, newline="") as f:
        for line_no, row in enumerate(csv.DictReader(f), 2):
            event_type = TYPE_SYNONYMS.get(row["event_type"].strip().lower())
            if event_type is None:
                continue  # remove_from_cart: not an event of our contract
            try:
                ts = _parse_time(row["event_time"])
            except ValueError as exc:
                raise DataError(f"{path}:{line_no}: {exc}") from exc
            price = float(row["price"]) if row.get("price") else None
            yield Interaction(row["user_id"], row["product_id"], event_type, ts, price=price,
                              category=row.get("category_code") or row.get("category_id")
                              or None,
                              session_id=row.get("user_session") or None)


def _parse_time(text: str) -> int:
    """Epoch ms from epoch seconds, epoch milliseconds, or ISO-8601 / 'YYYY-mm-dd HH:MM:SS UTC'.

    A bare number below 10^11 is seconds (that is before 1973 in milliseconds, after 5000 AD in
    seconds), otherwise milliseconds. Text without a zone is UTC.
    """
    value = text.strip()
    try:
        number = float(value)
    except ValueError:
        pass
    else:
        return int(number * 1000) if abs(number) < 1e11 else int(number)
    if value.endswith(" UTC"):
        value = value[:-4]
    try:
        moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError as exc:
        raise ValueError(f"unreadable time {text!r}") from exc
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return int(moment.timestamp() * 1000)


def load_interactions_csv(path: Path, *, user_col: str = "user_id", item_col: str = "item_id",
                          time_col: str = "timestamp",
                          type_col: str | None = None) -> list[Interaction]:
    """Any CSV of interactions (``.csv`` or ``.csv.gz``), one row per interaction.

    ``time_col`` holds epoch seconds, epoch milliseconds or ISO-8601 text (see
    :func:`_parse_time`). ``type_col`` values may be view/click/add_to_cart/purchase or a common
    synonym (cart, buy, order, ...); rows of other types (remove_from_cart, ...) are skipped.
    Without ``type_col`` every row is a ``purchase``. Optional columns ``price``, ``quantity``,
    ``category`` and ``session_id`` are used when present. A row with an empty user, item or
    time, or an unreadable time or number, is an error naming its line.
    """
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", newline="") as f:  # type: ignore[operator]
        text = f.read()
    reader = csv.DictReader(io.StringIO(text))
    columns = reader.fieldnames or []
    for col in (user_col, item_col, time_col, *([type_col] if type_col else [])):
        if col not in columns:
            raise DataError(f"{path}: no column {col!r} (columns: {', '.join(columns)})")
    rows: list[Interaction] = []
    for line_no, row in enumerate(reader, 2):
        user, item, when = (row[user_col] or "").strip(), (row[item_col] or "").strip(), \
            (row[time_col] or "").strip()
        if not (user and item and when):
            raise DataError(f"{path}:{line_no}: empty {user_col}, {item_col} or {time_col}")
        event_type = "purchase"
        if type_col:
            event_type = TYPE_SYNONYMS.get((row[type_col] or "").strip().lower(), "")
            if not event_type:
                continue
        try:
            ts = _parse_time(when)
            price = float(row["price"]) if row.get("price") else None
            quantity = int(float(row["quantity"])) if row.get("quantity") else None
        except ValueError as exc:
            raise DataError(f"{path}:{line_no}: {exc}") from exc
        rows.append(Interaction(user, item, event_type, ts, price=price, quantity=quantity,
                                category=row.get("category") or None,
                                session_id=row.get("session_id") or None))
    if not rows:
        raise DataError(f"{path}: no interactions")
    return _time_ordered(rows)


# --- sequences and splits ---------------------------------------------------------------------

@dataclass(frozen=True)
class UserSequence:
    user_id: str
    items: list[str]
    types: list[str]
    ts_ms: list[int]


def user_sequences(interactions: Sequence[Interaction]) -> list[UserSequence]:
    """Each user's interactions, in order; users in order of first appearance."""
    by_user: dict[str, UserSequence] = {}
    for it in interactions:
        seq = by_user.get(it.user_id)
        if seq is None:
            seq = by_user[it.user_id] = UserSequence(it.user_id, [], [], [])
        seq.items.append(it.item_id)
        seq.types.append(it.event_type)
        seq.ts_ms.append(it.ts_ms)
    return list(by_user.values())


@dataclass(frozen=True)
class Split:
    """Leave-one-out, as in the SASRec paper: per user, the last item is test, the one before
    it validation, the rest training. Users with fewer than 3 interactions train only."""

    train: list[UserSequence]
    valid: list[tuple[UserSequence, str]]  # (history, held-out item)
    test: list[tuple[UserSequence, str]]


def _prefix(seq: UserSequence, n: int) -> UserSequence:
    return UserSequence(seq.user_id, seq.items[:n], seq.types[:n], seq.ts_ms[:n])


def leave_one_out(sequences: Sequence[UserSequence]) -> Split:
    train, valid, test = [], [], []
    for seq in sequences:
        n = len(seq.items)
        if n < 3:
            train.append(seq)
            continue
        train.append(_prefix(seq, n - 2))
        valid.append((_prefix(seq, n - 2), seq.items[n - 2]))
        test.append((_prefix(seq, n - 1), seq.items[n - 1]))
    return Split(train, valid, test)
