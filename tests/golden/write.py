"""Write tests/golden/decisions-<version>.json for the committed model, from the engine's own decisions."""

from __future__ import annotations

import json
from typing import Any

from app.engine.engine import Engine
from compression.data import Split, load_clinc, load_wiki_pool
from tests.conftest import DATA, MODEL_DIR, ROOT, WIKI


def pools() -> dict[str, Split]:
    data = load_clinc(DATA)
    return {"validation": data.split("val"), "oos_train": data.split("oos_train"), "wiki_heldout": load_wiki_pool(WIKI)}


def golden_texts() -> list[str]:
    """The three pools' texts, in the golden file's order."""
    return [text for split in pools().values() for text in split.texts]


def decisions() -> dict[str, Any]:
    """The committed model's decision on every text of the three pools, and whether its first stage gave it."""
    engine = Engine.open(MODEL_DIR)
    last = len(engine.stage_names) - 1
    out: dict[str, Any] = {"model_version": engine.version, "pools": {}}
    for name, split in pools().items():
        d = engine.run(split.texts)
        out["pools"][name] = {
            "n": len(split),
            "intents": [engine.labels[i] for i in d.pred],
            "first_stage": "".join("1" if s < last else "0" for s in d.stage),
        }
    return out


def main() -> None:
    out = decisions()
    path = ROOT / "tests" / "golden" / f"decisions-{out['model_version']}.json"
    path.write_text(json.dumps(out, separators=(",", ":")) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
