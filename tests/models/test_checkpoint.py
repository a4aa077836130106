"""safetensors checkpoint I/O: round trips, optimizer state, checksums, atomic writes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from synthray.models.checkpoint import (
    ChecksumMismatch,
    flatten_state_dict,
    load_state,
    save_state,
    sha256_file,
    unflatten_state_dict,
)


def _assert_same(a: Any, b: Any) -> None:
    assert type(a) is type(b), (a, b)
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert torch.equal(a, b)
    elif isinstance(a, dict):
        assert list(a) == list(b)
        for k in a:
            _assert_same(a[k], b[k])
    elif isinstance(a, list | tuple):
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            _assert_same(x, y)
    else:
        assert a == b


def _trained_adam() -> tuple[torch.nn.Module, torch.optim.Adam]:
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4))
    opt = torch.optim.Adam(net.parameters(), lr=1e-3, betas=(0.5, 0.999))
    for _ in range(3):
        opt.zero_grad()
        net(torch.randn(2, 1, 8, 8)).square().mean().backward()
        opt.step()
    return net, opt


def test_save_load_round_trip(tmp_path: Path) -> None:
    tensors = {
        "w": torch.randn(3, 4),
        "i": torch.arange(5),
        "scalar": torch.tensor(2.5),
        "nhwc": torch.randn(2, 3, 4, 4).contiguous(memory_format=torch.channels_last),
    }
    meta = {"kind": "test", "n": 3, "nested": {"a": [1, 2.5, None]}}
    path = tmp_path / "sub" / "x.safetensors"
    digest = save_state(path, tensors, meta)
    assert digest == sha256_file(path)
    loaded, loaded_meta = load_state(path, digest)
    assert loaded_meta == meta
    assert set(loaded) == set(tensors)
    for k, v in tensors.items():
        assert torch.equal(loaded[k], v), k
    assert [p.name for p in path.parent.iterdir()] == ["x.safetensors"]  # no temp file left


def test_file_is_not_a_pickle(tmp_path: Path) -> None:
    path = tmp_path / "x.safetensors"
    save_state(path, {"w": torch.ones(2)}, {"kind": "test"})
    head = path.read_bytes()[:16]
    assert not head.startswith(b"\x80")  # pickle protocol marker
    assert not head.startswith(b"PK")  # torch.save zip container


def test_overwrite_replaces_file(tmp_path: Path) -> None:
    path = tmp_path / "x.safetensors"
    save_state(path, {"w": torch.zeros(2)}, {"v": 1})
    digest = save_state(path, {"w": torch.ones(2)}, {"v": 2})
    tensors, meta = load_state(path, digest)
    assert meta == {"v": 2} and torch.equal(tensors["w"], torch.ones(2))


def test_flipped_byte_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "x.safetensors"
    digest = save_state(path, {"w": torch.randn(64)}, {"kind": "test"})
    data = bytearray(path.read_bytes())
    data[-5] ^= 0x01  # inside tensor data: safetensors alone would not notice
    path.write_bytes(bytes(data))
    load_state(path)  # loads silently without a checksum
    with pytest.raises(ChecksumMismatch, match="expected"):
        load_state(path, digest)
    assert issubclass(ChecksumMismatch, ValueError)


def test_optimizer_state_round_trip_is_exact(tmp_path: Path) -> None:
    net, opt = _trained_adam()
    sd = opt.state_dict()
    assert isinstance(sd["state"][0]["step"], torch.Tensor)
    tensors, structure = flatten_state_dict(sd, "opt.")
    assert all(k.startswith("opt.") for k in tensors)
    path = tmp_path / "opt.safetensors"
    digest = save_state(path, tensors, {"opt": structure})
    loaded, meta = load_state(path, digest)
    restored = unflatten_state_dict(loaded, meta["opt"])
    _assert_same(sd, restored)

    # A fresh optimizer loaded from the file continues exactly like the original.
    net2, opt2 = _trained_adam()
    opt2.load_state_dict(restored)
    x = torch.randn(2, 1, 8, 8)
    for n, o in ((net, opt), (net2, opt2)):
        o.zero_grad()
        n(x).square().mean().backward()
        o.step()
    for a, b in zip(net.parameters(), net2.parameters(), strict=True):
        assert torch.equal(a, b)


def test_flatten_keeps_key_types_and_tuples() -> None:
    sd = {
        1: {"x": torch.ones(1)},
        "1": (1, 2.0, True, None, "s", [3]),
        "a.b": torch.ones(2),
        "a": {"b": torch.zeros(2)},  # same dotted path as "a.b"
    }
    tensors, structure = flatten_state_dict(sd)
    assert len(tensors) == 3
    _assert_same(sd, unflatten_state_dict(tensors, structure))
    with pytest.raises(TypeError):
        flatten_state_dict({"x": object()})
