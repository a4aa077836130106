"""The training loop and the sampler on a CUDA device (skipped without one; run by
scripts/gpu_check.sh): autocast precisions, GradScaler, exact resume and sampling."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from synthray.models.generators.config import TrainConfig
from synthray.models.generators.files import load_generator, save_generator
from synthray.models.generators.registry import ARCHITECTURES
from synthray.models.generators.sampling import sample_images
from synthray.models.generators.training import train_generator

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def _data(resolution: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(32, resolution, resolution), dtype=np.uint8)
    return images, np.arange(32) % 2


def _cfg(arch: str, resolution: int, **overrides: object) -> TrainConfig:
    base: dict[str, object] = {
        "architecture": arch,
        "resolution": resolution,
        "class_names": ["a", "b"],
        "batch_size": 8,
        **({"ae_batch_size": 8} if arch == "latentflow" else {}),
        "max_steps": 4,
        "device": "cuda",
        "checkpoint_every_s": 0.0,
    }
    return TrainConfig(**(base | overrides))  # type: ignore[arg-type]


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
@pytest.mark.parametrize("precision", ["auto", "fp32", "fp16"])
def test_trains_on_cuda(arch: str, precision: str) -> None:
    images, labels = _data(64)
    result = train_generator(images, labels, _cfg(arch, 64, precision=precision))
    assert result.device.startswith("cuda") and result.steps == 4
    expected = {"auto": "bf16" if torch.cuda.is_bf16_supported() else "fp16"}.get(
        precision, precision
    )
    assert result.precision == expected
    assert all(math.isfinite(v) for v in result.final_losses.values())
    assert all(t.device.type == "cpu" for t in result.generator_state.values())


@pytest.mark.parametrize("arch", ["projgan", "latentflow"])
def test_256_px_trains_and_samples_on_cuda(arch: str, tmp_path: Path) -> None:
    images, labels = _data(256)
    result = train_generator(images, labels, _cfg(arch, 256, max_steps=2))
    path = tmp_path / "g.safetensors"
    digest = save_generator(path, result.generator_state, result.generator_config)
    g = load_generator(path, digest)
    x, y = sample_images(g, {0: 3, 1: 3}, seed=1, device="cuda")
    assert x.shape == (6, 256, 256) and x.dtype == np.uint8 and x.std() > 0
    assert y.tolist() == [0, 0, 0, 1, 1, 1]


@pytest.mark.parametrize("arch", ["projgan", "latentflow"])
def test_resume_on_cuda_ends_where_an_uninterrupted_run_ends(arch: str, tmp_path: Path) -> None:
    images, labels = _data(64)
    cfg = _cfg(arch, 64, precision="fp32")
    torch.backends.cudnn.deterministic = True
    try:
        reference = train_generator(images, labels, cfg)
        calls = 0

        def stop_after_two() -> bool:
            nonlocal calls
            calls += 1
            return calls > 2

        ckpt = tmp_path / "run.safetensors"
        first = train_generator(
            images, labels, cfg, checkpoint_path=ckpt, should_stop=stop_after_two
        )
        assert first.stopped == "cancelled" and first.steps == 2
        second = train_generator(images, labels, cfg, checkpoint_path=ckpt)
        assert second.steps == 4
        for k, v in reference.generator_state.items():
            assert torch.allclose(v, second.generator_state[k], atol=1e-4), k
    finally:
        torch.backends.cudnn.deterministic = False
