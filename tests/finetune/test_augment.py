"""The joint dihedral augmentation: 8 distinct symmetries, the same one on every array of a sample."""

from __future__ import annotations

import numpy as np
import torch

from finetune.augment import DIHEDRAL_ELEMENTS, apply_dihedral, draw_dihedral, random_dihedral


def _asymmetric(h: int = 5, w: int = 5) -> np.ndarray:
    return np.arange(h * w).reshape(h, w)


def test_the_group_has_8_distinct_elements():
    image = _asymmetric()
    outputs = {apply_dihedral(image, k, flip, (0, 1)).tobytes() for k, flip in DIHEDRAL_ELEMENTS}
    assert len(DIHEDRAL_ELEMENTS) == 8 and len(outputs) == 8
    # and it is closed: composing two elements gives one of the 8
    for k1, f1 in DIHEDRAL_ELEMENTS:
        for k2, f2 in DIHEDRAL_ELEMENTS:
            twice = apply_dihedral(apply_dihedral(image, k1, f1, (0, 1)), k2, f2, (0, 1))
            assert twice.tobytes() in outputs


def test_numpy_and_torch_agree_for_every_element():
    image = np.random.default_rng(0).integers(0, 255, (6, 6, 3), dtype=np.uint8)
    for k, flip in DIHEDRAL_ELEMENTS:
        a = apply_dihedral(image, k, flip, (0, 1))
        b = apply_dihedral(torch.from_numpy(image), k, flip, (0, 1)).numpy()
        c = apply_dihedral(torch.from_numpy(image).permute(2, 0, 1), k, flip, (-2, -1)).permute(1, 2, 0).numpy()
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(a, c)
        assert a.flags["C_CONTIGUOUS"]


def test_the_same_transform_reaches_image_target_and_mask():
    rng = np.random.default_rng(3)
    image = rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)  # (H, W, 3)
    target = np.moveaxis(image[..., :2].astype(np.float32), -1, 0)  # (2, H, W), a copy of two channels
    mask = image[..., 0].astype(np.int32)  # (H, W)
    seen = set()
    for _ in range(64):
        he, tgt, msk = random_dihedral(image, target, mask, axes=[(0, 1), (-2, -1), (0, 1)], rng=rng)
        np.testing.assert_array_equal(np.moveaxis(tgt, 0, -1), he[..., :2].astype(np.float32))
        np.testing.assert_array_equal(msk, he[..., 0])
        seen.add(he.tobytes())
    assert len(seen) == 8  # every element is drawn


def test_torch_draws_follow_the_global_seed():
    pair = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).reshape(2, 3, 4, 4)
    torch.manual_seed(5)
    first = random_dihedral(pair)[0]
    torch.manual_seed(5)
    k = int(torch.randint(0, 4, ()))
    flip = bool(torch.randint(0, 2, ()))
    expected = torch.rot90(pair, k, dims=(-2, -1))
    if flip:
        expected = torch.flip(expected, dims=(-1,))
    torch.testing.assert_close(first, expected)


def test_numpy_draw_order_is_k_then_flip():
    a, b = np.random.default_rng(11), np.random.default_rng(11)
    for _ in range(20):
        assert draw_dihedral(a) == (int(b.integers(4)), bool(b.integers(2)))
