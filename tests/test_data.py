from __future__ import annotations

import json
from pathlib import Path

import pytest

from compression.data import OOS, label_order, load_clinc, load_wiki
from compression.errors import FactoryError


def write(tmp_path: Path, obj: object) -> Path:
    p = tmp_path / "d.json"
    p.write_text(json.dumps(obj))
    return p


def test_real_file_shapes_and_label_order(data_path: Path) -> None:
    data = load_clinc(data_path)
    assert len(data.labels) == 151
    assert OOS in data.labels
    assert data.labels == sorted(data.labels)
    assert len(data.split("train")) == 15250
    assert len(data.split("val")) == 3100
    assert sum(1 for i in data.split("val").intents if i == OOS) == 100


def test_label_order_does_not_depend_on_row_order() -> None:
    assert label_order(["b", "a", "c", "a"]) == label_order(["c", "a", "b"]) == ["a", "b", "c", OOS]


def test_committed_labels_match_the_data_order(data_path: Path) -> None:
    committed = json.loads((Path(__file__).parent.parent / "models/clinc150/labels.json").read_text())
    assert committed == load_clinc(data_path).labels


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(FactoryError, match="data file not found"):
        load_clinc(tmp_path / "nope.json")


def test_not_json(tmp_path: Path) -> None:
    p = tmp_path / "d.json"
    p.write_bytes(b"{oops")
    with pytest.raises(FactoryError, match="not valid UTF-8 JSON"):
        load_clinc(p)


@pytest.mark.parametrize("row", [["only text"], ["t", 3], "t", ["", "a"], ["t", "a", "extra"]])
def test_malformed_row(tmp_path: Path, row: object) -> None:
    p = write(tmp_path, {"train": [["hello", "a"], row], "val": [["x", "a"]]})
    with pytest.raises(FactoryError, match="malformed row 1 in 'train'"):
        load_clinc(p)


def test_unknown_intent_in_val(tmp_path: Path) -> None:
    p = write(tmp_path, {"train": [["hello", "a"]], "val": [["x", "zzz"]]})
    with pytest.raises(FactoryError, match="split 'val' has intents that are not in train: zzz"):
        load_clinc(p)


def test_optional_test_split(tmp_path: Path) -> None:
    p = write(
        tmp_path, {"train": [["a", "x"]], "oos_train": [["b", "oos"]], "test": [["c", "x"]], "oos_test": [["d", "oos"]]}
    )
    data = load_clinc(p)
    assert data.split("test").intents == ["x", "oos"]
    with pytest.raises(FactoryError, match="no 'val' split"):
        data.split("val")


def test_wiki_sample_is_seeded(tmp_path: Path) -> None:
    p = tmp_path / "w.txt"
    p.write_text("\n".join(f"sentence {i}" for i in range(100)))
    a, b = load_wiki(p, 10, seed=1), load_wiki(p, 10, seed=1)
    assert a.texts == b.texts
    assert a.intents == [OOS] * 10
    assert load_wiki(p, 0, seed=1).texts == []
