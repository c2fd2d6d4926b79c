from __future__ import annotations

import json
from pathlib import Path

import pytest

from compression.data import OOS, Split, label_order, load_clinc, load_wiki
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
    # oos_train stays out of training by default, for the OOS pool, and is a split of its own either way.
    assert len(data.split("train")) == 15000
    assert len(load_clinc(data_path, train_oos=True).split("train")) == 15250
    assert (len(data.split("oos_train")), len(data.split("oos_val"))) == (250, 100)
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
    # Two intents in train: one is refused (tests/test_team_data.py).
    p = write(
        tmp_path,
        {
            "train": [["a", "x"], ["e", "y"]],
            "oos_train": [["b", "oos"]],
            "test": [["c", "x"]],
            "oos_test": [["d", "oos"]],
        },
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


def test_download_verifies_the_sha256_and_leaves_nothing_behind_when_it_differs(tmp_path: Path) -> None:
    from app.engine.artifact import sha256_file
    from compression.data import download

    src = tmp_path / "upstream.txt"
    src.write_text("some sentence\n")
    dest = tmp_path / "out" / "wiki_sents.txt"
    assert download(dest, src.as_uri(), sha256_file(src)) == dest  # a file:// URL: urlretrieve reads it
    assert dest.read_bytes() == src.read_bytes()
    dest.unlink()
    with pytest.raises(FactoryError, match="downloaded file has sha256"):
        download(dest, src.as_uri(), "0" * 64)
    with pytest.raises(FactoryError, match="could not download"):
        download(dest, (tmp_path / "missing.txt").as_uri(), "0" * 64)
    assert sorted(p.name for p in dest.parent.iterdir()) == []


def test_make_data_fetches_what_the_default_recipe_reads() -> None:
    """Both defaults' files are downloaded, and each expected sha256 is that of the shared copy."""
    from app.engine.artifact import sha256_file
    from compression import data

    assert [name for name, _, _ in data.DOWNLOADS] == [data.DATA_FILE, data.WIKI_FILE]
    assert data.DEFAULT_WIKI.name == data.WIKI_FILE
    assert all(url.startswith(data.UPSTREAM) for _, url, _ in data.DOWNLOADS)
    wiki = Path(__file__).resolve().parent.parent / data.DEFAULT_WIKI
    if wiki.is_file():
        assert sha256_file(wiki) == data.WIKI_SHA256


def test_augmentation_masks_with_the_tokenizers_own_token() -> None:
    import random

    from compression.augment import augment, perturb

    words = [f"w{i}" for i in range(40)]
    text = " ".join(words)
    masked = perturb(text, ["x"], random.Random(0), "<mask>", rate=0.9)
    assert "<mask>" in masked.split()
    assert "[MASK]" not in masked
    # Without a mask token, a masked word is dropped: no placeholder appears, and fewer words remain.
    dropped = perturb(text, ["x"], random.Random(0), None, rate=0.9)
    assert all(w in words or w == "x" for w in dropped.split())
    assert len(dropped.split()) < len(masked.split())
    copies = augment(Split(["a b c", "d e f"], ["x", "y"]), 2, seed=1, mask=None)
    assert len(copies) == 4
    assert not any("[MASK]" in t for t in copies.texts)
