"""The MiniLM benchmark's calibration corpus stays disjoint from the held-out evaluation sentences."""

from __future__ import annotations

import random

import bench_scripts
import pytest

from deltacomp.quality.texts import CALIB_SENTENCES, HELDOUT_SENTENCES


@pytest.fixture(scope="module")
def corpus_mod():
    return bench_scripts.load("calib_corpus")


def test_corpus_is_deterministic_distinct_and_sized(corpus_mod):
    a = corpus_mod.corpus(200, 50, seed=3)
    assert a == corpus_mod.corpus(200, 50, seed=3)
    assert a != corpus_mod.corpus(200, 50, seed=4)
    written = corpus_mod.written()
    assert len(written) == 2447 + 1642
    assert len(a) == len(CALIB_SENTENCES) + len(written) + 250 == len({t.lower() for t in a})
    assert a[: len(CALIB_SENTENCES)] == list(CALIB_SENTENCES)


def test_generated_and_written_text_never_touch_the_held_out_set(corpus_mod):
    generated = corpus_mod.corpus(800, 300)[len(CALIB_SENTENCES):]
    held_grams = set().union(*(corpus_mod._trigrams(h) for h in HELDOUT_SENTENCES))
    for text in generated:
        assert not any(h.lower() in text.lower() for h in HELDOUT_SENTENCES), text
        assert not corpus_mod._trigrams(text) & held_grams, text
    words = " ".join(generated).lower()
    for state in ("crashloopbackoff", "imagepullbackoff", "oomkilled", "notready"):  # held-out state words
        assert state not in words


def test_leaks_catches_containment_and_shared_trigrams(corpus_mod):
    held = HELDOUT_SENTENCES[5]
    assert corpus_mod.leaks(f"yesterday {held.upper()} again")
    words = held.split()
    assert len(words) >= 3
    assert corpus_mod.leaks(f"unrelated start {' '.join(words[:3])} unrelated end")
    assert not corpus_mod.leaks("completely unrelated words here")


def test_draw_says_when_the_templates_run_out(corpus_mod):
    with pytest.raises(ValueError, match="fewer than 3 distinct"):
        corpus_mod._draw(lambda rng: rng.choice(["a b", "c d"]), 3, random.Random(0), set())
