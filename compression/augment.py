"""Transfer-set augmentation for distillation (in the spirit of TinyBERT): perturbed copies of the
training queries that the teacher labels softly, so the student sees more of the teacher's function
than 150 x 100 examples show. Copies carry no hard label."""

from __future__ import annotations

import random

from compression.data import Split

IGNORE = "__soft_only__"  # intent of a copy: only the teacher's soft targets apply


def perturb(text: str, vocabulary: list[str], rng: random.Random, mask: str | None, rate: float = 0.2) -> str:
    """Replace, drop or mask about `rate` of the words; always change at least one when possible. `mask` is
    the tokenizer's own mask token; without one, a masked word is dropped instead."""
    words = text.split()
    if len(words) < 2:
        return text
    out: list[str] = []
    changed = False
    for word in words:
        roll = rng.random()
        if roll < rate / 3:
            changed = True
            continue
        if roll < 2 * rate / 3:
            out.append(rng.choice(vocabulary))
            changed = True
        elif roll < rate:
            if mask is not None:
                out.append(mask)
            changed = True
        else:
            out.append(word)
    if not changed:
        i = rng.randrange(len(words))
        out = [*words[:i], rng.choice(vocabulary), *words[i + 1 :]]
    return " ".join(out) or text


def augment(split: Split, copies: int, seed: int, mask: str | None) -> Split:
    if copies <= 0:
        return Split([], [])
    rng = random.Random(seed)
    vocabulary = sorted({w for t in split.texts for w in t.split()})
    texts = [perturb(t, vocabulary, rng, mask) for _ in range(copies) for t in split.texts]
    return Split(texts, [IGNORE] * len(texts))
