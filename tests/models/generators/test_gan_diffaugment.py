"""DiffAugment: shapes, determinism, differentiability, and no flips."""

from __future__ import annotations

import pytest
import torch

from synthray.models.generators.diffaugment import (
    brightness_contrast,
    cutout,
    diff_augment,
    parse_policy,
    translate,
)

ALL = parse_policy("color,translation,cutout")


def _images(b: int = 6, r: int = 32) -> torch.Tensor:
    return torch.rand(b, 1, r, r, generator=torch.Generator().manual_seed(0)) * 2 - 1


def test_parse_policy() -> None:
    assert parse_policy("none") == () and parse_policy("") == ()
    assert parse_policy("cutout, color") == ("color", "cutout")
    with pytest.raises(ValueError, match="unknown augmentation"):
        parse_policy("translation,flip")
    with pytest.raises(ValueError, match="repeats"):
        parse_policy("cutout,cutout")


@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "bf16"])
def test_shape_dtype_and_determinism(layout: str) -> None:
    x = _images()
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    if layout == "bf16":
        x = x.bfloat16()
    a = diff_augment(x, ALL, torch.Generator().manual_seed(1))
    b = diff_augment(x, ALL, torch.Generator().manual_seed(1))
    c = diff_augment(x, ALL, torch.Generator().manual_seed(2))
    assert a.shape == x.shape and a.dtype == x.dtype
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert diff_augment(x, (), torch.Generator()) is x


def test_gradients_flow_to_the_input() -> None:
    x = _images().requires_grad_(True)
    diff_augment(x, ALL, torch.Generator().manual_seed(0)).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_translation_is_a_pure_shift_and_never_a_flip() -> None:
    # An image whose left and right halves differ: a flip would swap them.
    r = 32
    x = torch.zeros(64, 1, r, r)
    x[:, :, :, : r // 2] = -1.0
    x[:, :, :, r // 2 :] = 1.0
    x[:, :, 5, 7] = 0.5  # an asymmetric marker
    out = translate(x, torch.Generator().manual_seed(3))
    max_shift = 4  # 1/8 of 32
    for i in range(x.shape[0]):
        img = out[i, 0]
        found = (img == 0.5).nonzero()
        assert len(found) == 1, i
        dy, dx = (found[0] - torch.tensor([5, 7])).tolist()
        assert abs(dy) <= max_shift and abs(dx) <= max_shift
        expected = torch.zeros(r, r)  # pixels shifted in are 0
        ys = slice(max(0, dy), r + min(0, dy))
        xs = slice(max(0, dx), r + min(0, dx))
        src_ys = slice(max(0, -dy), r + min(0, -dy))
        src_xs = slice(max(0, -dx), r + min(0, -dx))
        expected[ys, xs] = x[i, 0, src_ys, src_xs]
        assert torch.equal(img, expected), i
        # Left stays dark and right stays bright: never mirrored.
        assert img[:, : r // 2 - max_shift].max() <= 0.5 and img[:, r // 2 + max_shift :].min() >= 0


def test_cutout_zeroes_one_square_and_keeps_the_rest() -> None:
    x = _images(b=16)
    out = cutout(x, torch.Generator().manual_seed(4))
    changed = out != x
    assert torch.equal(out[changed], torch.zeros_like(out[changed]))
    for i in range(x.shape[0]):
        rows = changed[i, 0].any(dim=1).nonzero()
        cols = changed[i, 0].any(dim=0).nonzero()
        assert len(rows) <= 16 and len(cols) <= 16  # at most half of the 32 side
        if len(rows):  # the zeroed pixels form one rectangle
            box = changed[i, 0, rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]
            assert box.all()


def test_brightness_contrast_is_an_affine_map_per_image() -> None:
    x = _images()
    out = brightness_contrast(x, torch.Generator().manual_seed(5))
    for i in range(x.shape[0]):
        a, b = x[i].flatten(), out[i].flatten()
        scale = (b[1] - b[0]) / (a[1] - a[0])
        assert 0.5 <= scale.item() <= 1.5
        assert torch.allclose(b, (a - a[0]) * scale + b[0], atol=1e-5)
