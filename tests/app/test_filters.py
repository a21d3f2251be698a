"""Metadata filters evaluated as numpy columns agree with the plain item-by-item reference
(`Filter.matches`) on every kind of value an index's metadata can hold."""

from __future__ import annotations

import random

import numpy as np
import pytest

from app.filters import Filter, MetadataColumns

VALUES = ["red", "Red car", "a red circle", "İstanbul", "straße", "", "12", "12.5", "x12", "nan", "NaN",
          "inf", 0, 12, 12.5, -3, 1.0, True, False, float("nan"), None, [1, 2], ["red"], {"a": 1}, "🐦 bird",
          "\udce9 lone"]


def _metadata(count: int, rng: random.Random) -> list[dict]:
    items = []
    for i in range(count):
        extra = {name: rng.choice(VALUES) for name in ("album", "year", "tags") if rng.random() < 0.8}
        items.append({"id": i, "source": f"{rng.choice(['cats', 'dogs', 'Cats'])}/{i:04}.png",
                      "caption": rng.choice(VALUES[:6] + [None]), "width": rng.choice([24, 48, 640]),
                      "height": 48, "sha256": f"{i:064x}", "duplicates": [], "extra": extra})
    return items


def _filters(rng: random.Random) -> list[Filter]:
    fields = ["album", "year", "tags", "caption", "source", "width", "missing"]
    plain = [v for v in VALUES if not isinstance(v, list | dict) and v is not None]
    found = []
    for _ in range(300):
        field = rng.choice(fields)
        kind = rng.choice(["eq", "prefix", "contains", "range", "gte", "lte"])
        if kind == "eq":
            found.append(Filter(field, eq=rng.choice(plain)))
        elif kind == "prefix":
            found.append(Filter(field, prefix=rng.choice(["", "r", "R", "cats/", "1", "İ", "a red"])))
        elif kind == "contains":
            found.append(Filter(field, contains=rng.choice(["red", "RED", "i̇", "SS", "ß", "2", "bird", ""])))
        else:
            low, high = sorted([rng.choice([-5, 0, 1, 12, 12.5, 48, 100]), rng.choice([0, 12, 48, 640])])
            found.append(Filter(field, gte=low if kind != "lte" else None, lte=high if kind != "gte" else None))
    return found


def test_columns_match_the_reference_on_every_kind_of_value() -> None:
    rng = random.Random(7)
    metadata = _metadata(400, rng)
    columns = MetadataColumns(metadata)
    filters = _filters(rng)
    for condition in filters:
        expected = [m["id"] for m in metadata if condition.matches(m)]
        assert columns.allowed_ids([condition]).tolist() == expected, condition
    for _ in range(100):  # several conditions at once: all must hold
        chosen = rng.sample(filters, rng.randint(2, 3))
        expected = [m["id"] for m in metadata if all(c.matches(m) for c in chosen)]
        assert columns.allowed_ids(chosen).tolist() == expected, chosen
    assert columns.allowed_ids([]).tolist() == list(range(400))


def test_edge_values() -> None:
    metadata = [{"id": 0, "extra": {"year": float("nan")}}, {"id": 1, "extra": {"year": "2019"}},
                {"id": 2, "extra": {"year": True}}, {"id": 3, "extra": {"year": [2019]}}, {"id": 4}]
    columns = MetadataColumns(metadata)
    # NaN is no number: no range holds for it; a numeric string counts as its number
    assert columns.allowed_ids([Filter("year", gte=-1e9)]).tolist() == [1, 2]
    assert columns.allowed_ids([Filter("year", eq=True)]).tolist() == [2]
    assert columns.allowed_ids([Filter("year", eq=1)]).tolist() == [2]  # as Python compares: True == 1
    assert columns.allowed_ids([Filter("year", prefix="[2019")]).tolist() == [3]
    assert columns.allowed_ids([Filter("year", contains="")]).tolist() == [0, 1, 2, 3]  # present only
    assert columns.allowed_ids([Filter("album", eq="x")]).dtype == np.int64


def test_an_unknown_column_kind_is_a_programming_error() -> None:
    with pytest.raises(ValueError, match="column kind"):
        MetadataColumns([])._build("sorted", "year")
