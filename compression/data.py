"""The factory's dataset (labels and named splits), CLINC150 in its original JSON format (reading, validating),
the fixed label order, and the Wikipedia sentences. A team's own CSV or JSONL files: compression.labelled."""

from __future__ import annotations

import json
import random
import re
import unicodedata
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from app.engine.artifact import sha256_file
from compression.errors import FactoryError

OOS = "oos"
UPSTREAM = "https://raw.githubusercontent.com/clinc/oos-eval/master/data"
ORIGINAL_URL = f"{UPSTREAM}/data_oos_plus.json"
ORIGINAL_SHA256 = "bfcca9ae515623541dc1983c94c4ed7cae9d26b42ae47d74b972e51bb6f7a21f"
# The dataset authors' Wikipedia sentences (the paper's "wiki_aug" material), used as extra out-of-scope
# training examples. Upstream it is data/all_wiki_sents.txt in the same repository (at commit 48a0e1c:
# 750,542 bytes, the same size and first lines as the copy in ../shared/data/clinc150/wiki_sents.txt). The
# sha256 is that local copy's, which the shared SHA256SUMS also lists; it could not be checked against a
# download from here (no internet), so a mismatch on first use would mean the two differ after all.
WIKI_URL = f"{UPSTREAM}/all_wiki_sents.txt"
WIKI_SHA256 = "570704f8120d13d27dda90d116a0b2365e121139f72c2967b65f55465ebfad44"
# The defaults of --data and --wiki (the factory's only definitions of these paths).
DEFAULT_DATA = Path("../shared/data/clinc150/clinc150_plus_train_val.json")
DEFAULT_WIKI = Path("../shared/data/clinc150/wiki_sents.txt")
# Where `make data` (`python -m compression data`) puts both files; pass --data and --wiki to use them.
DOWNLOAD_DIR = Path("data/clinc150")
DATA_FILE, WIKI_FILE = "data_oos_plus.json", "wiki_sents.txt"
DOWNLOADS = ((DATA_FILE, ORIGINAL_URL, ORIGINAL_SHA256), (WIKI_FILE, WIKI_URL, WIKI_SHA256))

# CLINC150's own files, by sha256: the original, and the shared copy without its test split (../shared's
# SHA256SUMS lists both). Another file in its format is a team's (compression.pipeline.Context.data_source).
CLINC_SHA256S = frozenset({ORIGINAL_SHA256, "77c57c39989743df538dbcfa4d56393e04e235120330e5cc66f02bb2f37f8d5b"})
# What the card's provenance says of CLINC150 data.
SOURCE = {
    "name": "CLINC150 (oos-eval), 'plus' configuration",
    "license": "CC BY 3.0",
    "source": "https://github.com/clinc/oos-eval",
    "citation": "Larson et al., An Evaluation Dataset for Intent Classification and Out-of-Scope Prediction, "
    "EMNLP-IJCNLP 2019",
}

# In-scope and out-of-scope parts of each split, as the original file names them.
_SPLIT_KEYS = {"train": ("train", "oos_train"), "val": ("val", "oos_val"), "test": ("test", "oos_test")}
# The out-of-scope parts, also kept as splits of their own: with --no-train-oos, oos_train + oos_val is the
# 350-query pool of real CLINC out-of-scope queries OOS recall is reported on (compression.measure.pools).
OOS_PARTS = ("oos_train", "oos_val")
# A team's out-of-scope examples (--oos-data) are split in two: this half tunes the choice of OOS rule, the rest
# is `oos_val`, reported on and chosen on by nothing (compression.labelled, compression.measure.pools).
OOS_TUNE = "oos_tune"
# Wikipedia sentences that no stage trains on: a fixed shuffle (its own seed, so --seed never moves a sentence
# between training and evaluation) sets the last WIKI_POOL_SIZE aside as an easier out-of-scope pool.
WIKI_POOL_SIZE = 2000
_WIKI_POOL_SEED = 150


@dataclass(frozen=True)
class Split:
    texts: list[str]
    intents: list[str]

    def __len__(self) -> int:
        return len(self.texts)

    def label_ids(self, labels: list[str]) -> list[int]:
        """Indices into `labels`; -100 (ignored by the cross-entropy) for soft-label-only rows."""
        index = {name: i for i, name in enumerate(labels)}
        return [index.get(intent, -100) for intent in self.intents]

    def subset(self, n: int, seed: int) -> Split:
        """A stratification-free random sample, for quick runs and tests."""
        if n >= len(self):
            return self
        order = random.Random(seed).sample(range(len(self)), n)
        return Split([self.texts[i] for i in order], [self.intents[i] for i in order])

    def __add__(self, other: Split) -> Split:
        return Split(self.texts + other.texts, self.intents + other.intents)


@dataclass(frozen=True)
class Dataset:
    labels: list[str]
    splits: dict[str, Split]

    def split(self, name: str) -> Split:
        if name not in self.splits:
            raise FactoryError(f"the data file has no '{name}' split (it has: {', '.join(sorted(self.splits))})")
        return self.splits[name]

    def optional(self, name: str) -> Split:
        """A split that only some datasets have (CLINC150's oos_train, out-of-scope examples): empty if absent."""
        return self.splits.get(name, Split([], []))


def label_order(train_intents: list[str]) -> list[str]:
    """Sorted intent names; the order is fixed by the names alone, so it never depends on row order."""
    return sorted(set(train_intents) | {OOS})


# A run of letters and digits, or one punctuation mark or symbol: the pieces BERT's pre-tokenizer splits a text
# into (it splits at whitespace and around each punctuation mark; `_` is punctuation to it).
_PIECES = re.compile(r"[^\W_]+|[^\w\s]|_")


def text_key(text: str) -> str:
    """Texts that the served model cannot tell apart count as one text: its tokenizer (BERT's, uncased) folds
    case and strips accents, and splits at whitespace and around punctuation, so `Résumé` is `resume` and
    `what's` is `what ' s`."""
    folded = unicodedata.normalize("NFD", text.casefold())
    folded = "".join(c for c in folded if unicodedata.category(c) != "Mn")
    return " ".join(_PIECES.findall(folded))


def _parse_rows(rows: object, key: str) -> Split:
    if not isinstance(rows, list):
        raise FactoryError(f"'{key}' must be a list of [text, intent] rows")
    texts: list[str] = []
    intents: list[str] = []
    for i, row in enumerate(rows):
        if not (isinstance(row, list) and len(row) == 2 and all(isinstance(x, str) for x in row)):
            raise FactoryError(f"malformed row {i} in '{key}': expected [text, intent], got {str(row)[:80]}")
        if not row[0].strip():
            raise FactoryError(f"malformed row {i} in '{key}': empty text")
        if not row[1].strip():
            raise FactoryError(f"malformed row {i} in '{key}': empty intent")
        for name, value in zip(("text", "intent"), row, strict=True):
            # A JSON escape can spell half a surrogate pair ("\ud800"), which no UTF-8 text holds: the tokenizer
            # fails on it in the middle of the build.
            try:
                value.encode("utf-8")
            except UnicodeEncodeError as exc:
                raise FactoryError(
                    f"malformed row {i} in '{key}': the {name} holds {value[exc.start]!r}, half of a UTF-16 "
                    "surrogate pair and not a character"
                ) from None
        texts.append(row[0])
        intents.append(row[1])
    return Split(texts, intents)


def _check_parts(path: Path, parts: dict[str, Split]) -> None:
    """The checks a team's CSV or JSONL gets (compression.labelled), on the parts of a CLINC150-format file that
    the factory reads (its `test` parts: none), rows counted from 0 as in `malformed row`. But one: a `val` text
    that `train` also has is reported, not refused, since CLINC150's own val has 3 and its file is read as it
    stands."""
    keys = {name: [text_key(text) for text in part.texts] for name, part in parts.items()}
    in_scope: dict[str, tuple[str, int]] = {}  # a text's key: the in-scope part and row it is first in
    for name in ("train", "val"):
        part = parts.get(name, Split([], []))
        seen: dict[str, int] = {}
        for i, (key, intent) in enumerate(zip(keys.get(name, []), part.intents, strict=True)):
            if intent.casefold() == OOS:
                raise FactoryError(
                    f"row {i} in '{name}': the intent {intent!r} is the out-of-scope label; out-of-scope queries "
                    f"go in 'oos_{name}'"
                )
            first = seen.setdefault(key, i)
            if part.intents[first] != intent:
                raise FactoryError(
                    f"row {i} in '{name}': the text {part.texts[i][:60]!r} is {intent!r} here and "
                    f"{part.intents[first]!r} in row {first}"
                )
            in_scope.setdefault(key, (name, i))
    intents = sorted(set(parts["train"].intents))
    if len(intents) < 2:
        # One class gives the classifier nothing to learn and several OOS rules nothing to compare.
        what = f"every example in 'train' is the intent {intents[0]!r}" if intents else "'train' has no examples"
        raise FactoryError(f"{path}: {what}; the model chooses among intents, so at least 2 are needed")
    if "val" in parts and not parts["val"].texts:
        # Every stage that chooses or reports reads it: an empty one failed at the embedder stage.
        raise FactoryError(
            f"{path}: 'val' has no examples; the stages choose and report on it, so at least 1 is needed"
        )
    for name in OOS_PARTS:
        for i, key in enumerate(keys.get(name, [])):
            if key in in_scope:
                where, row = in_scope[key]
                raise FactoryError(
                    f"row {i} in '{name}': the text is also in scope (row {row} in '{where}'); an out-of-scope "
                    "example cannot be in scope too"
                )
    trained = set(keys["train"])
    twins = [i for i, key in enumerate(keys.get("val", [])) if key in trained]
    if twins:
        print(
            f"warning: {path}: 'train' also has {len(twins)} of the {len(parts['val'])} texts of 'val', the first "
            f"{parts['val'].texts[twins[0]]!r} (row {twins[0]}); kept, as CLINC150's own val has 3"
        )


def load_clinc(path: Path | str, train_oos: bool = False) -> Dataset:
    """Read a CLINC150 JSON file; raise FactoryError with one clear line on any problem. The `train` split
    holds the 250 `oos_train` queries unless train_oos is off, which keeps them for evaluation; `oos_train`
    and `oos_val` are also splits of their own."""
    path = Path(path)
    if not path.is_file():
        raise FactoryError(f"data file not found: {path} (set --data, or run 'make data' to download it)")
    try:
        # A byte-order mark, as a team's CSV or JSONL may have (compression.labelled), is not JSON's own.
        raw = json.loads(path.read_text(encoding="utf-8").removeprefix("\ufeff"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise FactoryError(f"data file {path} is not valid UTF-8 JSON: {exc}") from None
    except (ValueError, RecursionError) as exc:  # JSON that Python will not hold: 5,000-digit numbers, deep nests
        raise FactoryError(f"data file {path} is not JSON this reader takes ({type(exc).__name__})") from None
    if not isinstance(raw, dict) or "train" not in raw:
        raise FactoryError(f"data file {path} is not in the CLINC150 format (no 'train' key)")
    parts = {k: _parse_rows(raw[k], k) for keys in _SPLIT_KEYS.values() for k in keys if k in raw}
    splits: dict[str, Split] = {}
    for name, keys in _SPLIT_KEYS.items():
        present = [parts[k] for k in keys if k in parts and (train_oos or k != "oos_train")]
        if present:
            merged = present[0]
            for part in present[1:]:
                merged = merged + part
            splits[name] = merged
    for key in OOS_PARTS:
        if key in parts:
            splits[key] = parts[key]
    labels = label_order(splits["train"].intents)
    known = set(labels)
    for name, split in splits.items():
        unknown = sorted(set(split.intents) - known)
        if unknown:
            raise FactoryError(f"split '{name}' has intents that are not in train: {', '.join(unknown[:5])}")
    _check_parts(path, parts)
    return Dataset(labels=labels, splits=splits)


def _wiki_parts(path: Path | str) -> tuple[list[str], list[str]]:
    """The Wikipedia sentences stages may train on, and the held-out pool (see WIKI_POOL_SIZE)."""
    path = Path(path)
    if not path.is_file():
        raise FactoryError(f"wiki sentences file not found: {path} (set --wiki; `make data` downloads it)")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise FactoryError(f"wiki sentences file {path} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    lines = sorted({line.strip() for line in text.splitlines() if line.strip()})
    random.Random(_WIKI_POOL_SEED).shuffle(lines)
    cut = len(lines) - min(WIKI_POOL_SIZE, len(lines) // 5)  # a small file (tests) keeps most for training
    return lines[:cut], lines[cut:]


def check_wiki(path: Path | str) -> None:
    """The file read and split as the stages will: one that is not UTF-8, or too short to hold a sentence out,
    had failed after the stages before them had trained."""
    trainable, pool = _wiki_parts(path)
    if not pool:
        count = len(trainable)
        raise FactoryError(f"wiki sentences file {path} has {count} different sentences; at least 5 are needed")


def load_wiki(path: Path | str, n: int, seed: int) -> Split:
    """Up to n Wikipedia sentences, labelled out-of-scope (the dataset authors' 'wiki_aug' material), never
    from the held-out pool."""
    if n <= 0:
        return Split([], [])
    trainable, _ = _wiki_parts(path)
    chosen = random.Random(seed).sample(trainable, min(n, len(trainable)))
    return Split(chosen, [OOS] * len(chosen))


def load_wiki_transfer(path: Path | str, n: int, seed: int, exclude: set[str], intent: str) -> Split:
    """Up to n Wikipedia sentences stages may train on, other than `exclude`, all with `intent` (a soft-only one:
    transfer-set material the teacher labels), never from the held-out pool."""
    if n <= 0:
        return Split([], [])
    trainable, _ = _wiki_parts(path)
    rest = [s for s in trainable if s not in exclude]
    chosen = random.Random(seed + 1).sample(rest, min(n, len(rest)))
    return Split(chosen, [intent] * len(chosen))


def load_wiki_pool(path: Path | str) -> Split:
    """The held-out Wikipedia sentences, labelled out-of-scope: no stage trains on them."""
    _, pool = _wiki_parts(path)
    return Split(pool, [OOS] * len(pool))


def download(dest: Path, url: str = ORIGINAL_URL, sha256: str = ORIGINAL_SHA256) -> Path:
    """Fetch `url` to `dest` (for users with the internet) and verify its sha256; a bad download leaves no file."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_suffix(".part")
    try:
        urllib.request.urlretrieve(url, tmp)  # noqa: S310 - fixed https URLs (file:// in tests)
    except (OSError, ValueError) as exc:
        tmp.unlink(missing_ok=True)
        raise FactoryError(f"could not download {url}: {exc}") from None
    got = sha256_file(tmp)
    if got != sha256:
        tmp.unlink(missing_ok=True)
        raise FactoryError(f"downloaded file has sha256 {got}, expected {sha256}")
    tmp.replace(dest)
    return dest


def download_all(directory: Path = DOWNLOAD_DIR) -> list[Path]:
    """Everything the default recipe reads: the CLINC150 file and the Wikipedia sentences, each verified."""
    return [download(directory / name, url, sha256) for name, url, sha256 in DOWNLOADS]
