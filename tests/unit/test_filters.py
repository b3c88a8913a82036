"""The seed's filters: near-duplicates at cosine >= 0.5, on crafted cases."""

from __future__ import annotations

import random

import numpy as np

from jobs.data.filters import cosine_matrix, near_duplicates

BASE = "How can I keep my basil plant healthy on a sunny kitchen windowsill in summer?"
NEAR = "How can I keep my basil plant healthy on a sunny kitchen windowsill during summer?"
OTHER = [
    "Explain how compound interest grows a savings account over ten years.",
    "내일 아침 등산을 가려는데 어떤 준비물이 필요할까요?",
    "Write a short poem about the sea at night and the sound of waves.",
    "What are the rules of chess for castling with the king and rook?",
]


def test_drops_exactly_the_near_duplicates_and_keeps_the_first():
    texts = [BASE, OTHER[0], NEAR, OTHER[1], BASE, OTHER[2], OTHER[3]]
    sims = cosine_matrix(texts)
    assert sims[0, 2] >= 0.5 and sims[0, 4] > 0.99  # the crafted duplicates are duplicates
    assert np.all(sims[np.ix_([0, 1, 3, 5, 6], [0, 1, 3, 5, 6])][~np.eye(5, dtype=bool)] < 0.5)

    assert near_duplicates(texts, 0.5) == [False, False, True, False, True, False, False]


def test_threshold_decides_by_the_exact_cosine():
    texts = [BASE, NEAR]
    similarity = cosine_matrix(texts)[0, 1]
    assert near_duplicates(texts, similarity - 1e-4) == [False, True]
    assert near_duplicates(texts, similarity + 1e-4) == [False, False]


def test_agrees_with_the_quadratic_definition_across_batches():
    rng = random.Random(0)
    words = [f"w{i}" for i in range(300)]
    bases = [" ".join(rng.sample(words, 12)) for _ in range(150)]
    texts = []
    for base in bases:  # each base and a few noisy copies, spread over several batches
        texts.append(base)
        for _ in range(rng.randint(0, 3)):
            tokens = base.split()
            tokens[rng.randrange(len(tokens))] = rng.choice(words)
            texts.append(" ".join(tokens))
    rng.shuffle(texts)

    sims = cosine_matrix(texts)
    expected, kept = [], []
    for i in range(len(texts)):  # greedy in order, by brute force
        dup = any(sims[i, j] >= 0.5 for j in kept)
        expected.append(dup)
        if not dup:
            kept.append(i)

    assert near_duplicates(texts, 0.5, batch=64) == expected
    assert 0 < sum(expected) < len(texts)
