"""finetune.controls: block bootstrap intervals, paired differences and the controls gate."""

from __future__ import annotations

import numpy as np
import pytest

from finetune.controls import block_bootstrap, difference, gate, interval, spatial_blocks, verdict


def test_spatial_blocks_are_compact_and_unique_across_slides():
    rng = np.random.default_rng(0)
    xy = rng.uniform(0, 1000, size=(400, 2))
    slides = np.repeat(["a", "b"], 200)
    blocks = spatial_blocks(xy, slides, n_blocks=10)
    assert len(np.unique(blocks[:200])) == 5 and len(np.unique(blocks[200:])) == 5
    assert not set(blocks[:200]) & set(blocks[200:])
    # Compact: a block's cells are much closer to each other than random cells of the slide are.
    spread = np.mean([xy[blocks == b].std(axis=0).mean() for b in np.unique(blocks)])
    assert spread < 0.6 * xy[:200].std(axis=0).mean()


def test_block_bootstrap_is_paired_and_its_interval_has_the_textbook_width():
    rng = np.random.default_rng(1)
    values = rng.normal(0, 1, 400)
    blocks = np.repeat(np.arange(40), 10)
    a = block_bootstrap(lambda rows: values[rows].mean(), blocks, n_boot=2000, seed=3)
    b = block_bootstrap(lambda rows: values[rows].mean(), blocks, n_boot=2000, seed=3)
    np.testing.assert_array_equal(a, b)  # same seed, same resamples
    low, high = interval(a)
    # The mean of 40 resampled blocks: standard error = sd of the block means / sqrt(40).
    block_means = values.reshape(40, 10).mean(axis=1)
    assert high - low == pytest.approx(2 * 1.96 * block_means.std() / np.sqrt(40), rel=0.1)
    assert low < values.mean() < high


def test_differences_and_verdicts():
    rng = np.random.default_rng(2)
    base = rng.normal(0.2, 0.05, 1000)
    shifted = difference(0.1, base + 0.1 + rng.normal(0, 0.01, 1000), base)
    assert shifted.excludes_zero and shifted.p < 0.01 and "beats" in verdict("ours", shifted)
    same = difference(0.001, base + rng.normal(0, 0.02, 1000), base)
    assert not same.excludes_zero and "no detectable gain" in verdict("ours", same)
    worse = difference(-0.1, base - 0.1, base)
    assert "WORSE" in verdict("ours", worse)


def test_gate_needs_the_oracle_above_random_and_the_shuffled_oracle_not():
    rng = np.random.default_rng(3)
    random_reps = rng.normal(0.14, 0.02, 1000)
    oracle = (0.38, random_reps + 0.24 + rng.normal(0, 0.01, 1000))
    null = (0.14, random_reps + rng.normal(0, 0.01, 1000))
    assert gate(oracle, (0.14, random_reps), null).passes
    assert not gate(null, (0.14, random_reps)).passes  # an oracle no better than random
    assert not gate(oracle, (0.14, random_reps), oracle).passes  # "signal" in shuffled labels
    assert "FAIL" in gate(null, (0.14, random_reps)).describe()
