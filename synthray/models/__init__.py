"""Pure PyTorch part of synthray, one subpackage per subsystem.

- ``generators/``: the generators (one network file per architecture, listed in
  ``generators/registry.py``),
  their losses and DiffAugment, the training loop (``config``, ``trainer``), generator files,
  sampling and preview grids.
- ``gate/``: the memorization check: exact nearest-neighbour search, the robust pixel matcher
  (``imageops``, ``correlation``, ``pixelmatch``), the copy-detection embedding, and the
  three-space check itself (``memorization``, with ``register``).
- ``evaluation/``: offline quality metrics (FID, KID, precision/recall) in a site's own encoder.
- ``runtime.py``: device, precision and process-memory choices; ``checkpoint.py``: safetensors
  files that carry their config.

Nothing here imports from ``synthray.app``, ``synthray.workers`` or ``synthray.cli``; import the
submodules you need directly.
"""
