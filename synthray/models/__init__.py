"""Pure PyTorch part of synthray: networks, training loop, sampling and the memorization check.

Nothing here imports from ``synthray.app``, ``synthray.workers`` or ``synthray.cli``; import the
submodules you need (``synthray.models.dcgan``, ``.training``, ``.sampling``, ``.checkpoint``,
``.memorization``) directly.
"""
