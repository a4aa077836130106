"""A picture people look at: per class, generated images beside real held-out ones.

One band per class: its name, then a row of generated images and, under it, a row of real
images of patients the generator never saw, at the generator's resolution (no rescaling, so
what is sharp or blurred shows as it is). It holds real radiographs, so whoever serves it
must treat it like the evidence page (staff only, audited).
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageDraw

GAP = 4
LABEL_HEIGHT = 14
ROW_LABEL_WIDTH = 80


def gallery_png(
    generated: np.ndarray,
    generated_labels: np.ndarray,
    real: np.ndarray,
    real_labels: np.ndarray,
    class_names: list[str],
    per_class: int = 8,
    seed: int = 0,
    notes: dict[str, str] | None = None,
) -> bytes:
    """PNG bytes of the gallery; images are uint8 (N, R, R), labels index ``class_names``.
    Real images are drawn at random (``seed``) within their class; a class with fewer images
    than ``per_class`` leaves the rest of its row empty. ``notes`` adds a remark after a
    class's name (for example that it cannot be exported)."""
    if generated.ndim != 3 or real.ndim != 3 or generated.shape[1:] != real.shape[1:]:
        raise ValueError("generated and real images must be (N, R, R) of one resolution")
    rng = np.random.default_rng(seed)
    r = generated.shape[1]
    band = LABEL_HEIGHT + 2 * r + 3 * GAP
    width = ROW_LABEL_WIDTH + per_class * (r + GAP) + GAP
    canvas = Image.new("L", (width, band * len(class_names)), color=255)
    draw = ImageDraw.Draw(canvas)
    for c, name in enumerate(class_names):
        top = c * band
        note = (notes or {}).get(name)
        draw.text((GAP, top + 1), f"{name}  ({note})" if note else name, fill=0)
        for row, (images, labels, title) in enumerate(
            ((generated, generated_labels, "synthetic"), (real, real_labels, "real, unseen"))
        ):
            y = top + LABEL_HEIGHT + GAP + row * (r + GAP)
            draw.text((GAP, y + r // 2 - 6), title, fill=90)
            pool = np.flatnonzero(labels == c)
            if row == 1 and len(pool) > per_class:
                pool = np.sort(rng.choice(pool, per_class, replace=False))
            for j, i in enumerate(pool[:per_class]):
                x = ROW_LABEL_WIDTH + j * (r + GAP)
                canvas.paste(Image.fromarray(images[i], "L"), (x, y))
    buf = io.BytesIO()
    canvas.save(buf, format="PNG")
    return buf.getvalue()
