"""Patients, not films, as the unit of the gate's comparisons between training and held-out
images: one patient's films look alike (same body, often the same day), so a side drawn by
film lets a few often-imaged patients stand for many, and two sides drawn that way are not
alike even when nothing was memorized."""

from __future__ import annotations

import numpy as np


def one_film_each(keys: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """(P,) sorted indices: one film drawn at random for each distinct patient key."""
    order = rng.permutation(len(keys))
    _, first = np.unique(np.asarray(keys).astype(str)[order], return_index=True)
    return np.sort(order[first])


def keys_or_films(keys: np.ndarray | None, n: int) -> np.ndarray:
    """``keys``, checked against the number of films; without keys each film is a patient."""
    if keys is None:
        return np.arange(n)
    if len(keys) != n:
        raise ValueError("every film needs its patient key")
    return np.asarray(keys)
