"""Generator files: the weights of a trained generator plus the config that rebuilds it.

A file is a safetensors file (:mod:`synthray.models.checkpoint`) whose meta holds ``kind``
(``"generator"``), ``architecture`` (a key of
:data:`synthray.models.generators.registry.ARCHITECTURES`) and ``config``; the registry gives
the class to rebuild, so no file ever names code.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from synthray.models.checkpoint import load_state, save_state
from synthray.models.generators import registry


def save_generator(
    path: Path,
    generator_state: dict[str, Tensor],
    generator_config: dict[str, Any],
    extra_meta: dict[str, Any] | None = None,
    *,
    architecture: str | None = None,
) -> str:
    """Write a generator and the config that rebuilds it to a safetensors file; return sha256.

    ``architecture`` (``TrainResult.architecture``) may be omitted: it is then recognised from
    the config's keys. The state is checked against the config (same names and shapes) before
    anything is written. The file's meta holds ``architecture`` and ``config``, which is all
    :func:`load_generator` needs.
    """
    arch = registry.get(architecture or registry.architecture_of(generator_config))
    cfg = arch.config.from_dict(generator_config)
    with torch.device("meta"):
        reference = arch.generator(cfg).state_dict()
    if set(reference) != set(generator_state):
        missing = sorted(set(reference) - set(generator_state))
        unexpected = sorted(set(generator_state) - set(reference))
        raise ValueError(
            f"generator state does not fit its config: missing {missing}, unexpected {unexpected}"
        )
    for k, ref in reference.items():
        if tuple(generator_state[k].shape) != tuple(ref.shape):
            raise ValueError(
                f"generator state {k} has shape {tuple(generator_state[k].shape)}, "
                f"config implies {tuple(ref.shape)}"
            )
    meta: dict[str, Any] = {
        "kind": "generator",
        "architecture": arch.name,
        "config": cfg.to_dict(),
    }
    if extra_meta:
        clash = sorted(set(extra_meta) & set(meta))
        if clash:
            raise ValueError(f"extra_meta must not override {clash}")
        meta.update(extra_meta)
    return save_state(path, generator_state, meta)


def load_generator(path: Path, expected_sha256: str | None) -> nn.Module:
    """Rebuild a generator, in eval mode on CPU, from a file written by :func:`save_generator`.

    The network (the ``generator`` class of its registry entry, called as ``G(z, y)`` and
    carrying its config as ``.cfg``) is built from the architecture and config stored in the
    file alone. With ``expected_sha256`` the file is verified first
    (:class:`~synthray.models.checkpoint.ChecksumMismatch`).
    """
    tensors, meta = load_state(Path(path), expected_sha256)
    if meta.get("kind") != "generator":
        raise ValueError(f"{path} is not a generator file (kind={meta.get('kind')!r})")
    name = meta.get("architecture")
    if name not in registry.ARCHITECTURES:
        raise ValueError(f"{path}: unsupported generator architecture {name!r}")
    arch = registry.ARCHITECTURES[name]
    cfg = arch.config.from_dict(meta["config"])
    with torch.device("meta"):
        net = arch.generator(cfg)
    net.load_state_dict(tensors, strict=True, assign=True)
    return net.eval()
