"""A self-contained HTML page of memorization evidence, for reviewers inside the site.

Every flagged image, and a sample of passed ones, is shown beside its nearest training
images with their similarity scores. The page embeds real training images, so it is
served only to staff roles and is never part of an export bundle.
"""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Callable
from typing import Any

import numpy as np
from fastapi.responses import HTMLResponse
from PIL import Image

STYLE = """
body{font:14px/1.4 system-ui,sans-serif;margin:24px;color:#222}
h1{font-size:20px}h2{font-size:16px;margin-top:28px}
table.summary td{padding:2px 12px 2px 0}
.row{display:flex;gap:10px;align-items:flex-start;margin:10px 0;padding:8px;
  border:1px solid #ddd;border-radius:6px}
.row.flagged{border-color:#c0392b;background:#fdf2f1}
figure{margin:0;text-align:center;font-size:12px}
img{width:128px;height:128px;image-rendering:pixelated;display:block}
.verdict{font-weight:600}.flagged .verdict{color:#c0392b}
"""


def png_data_uri(img: np.ndarray) -> str:
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(img, dtype=np.uint8), "L").save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _figure(img: np.ndarray, caption: str) -> str:
    return (
        f'<figure><img alt="" src="{png_data_uri(img)}">'
        f"<figcaption>{html.escape(caption)}</figcaption></figure>"
    )


def render(
    report: dict[str, Any],
    synthetic: np.ndarray,
    training_image: Callable[[int], np.ndarray],
    *,
    title: str,
    passed_sample: int = 24,
    seed: int = 0,
) -> str:
    """``training_image(dataset_position)`` returns that training image (R, R) uint8."""
    images = report["images"]
    flagged = [im for im in images if im["flagged"]]
    passed = [im for im in images if not im["flagged"]]
    rng = np.random.default_rng(seed)
    if len(passed) > passed_sample:
        keep = sorted(rng.choice(len(passed), size=passed_sample, replace=False).tolist())
        passed = [passed[i] for i in keep]

    def row(im: dict[str, Any]) -> str:
        cells = [_figure(synthetic[im["index"]], f"#{im['index']} {im['class']}")]
        for nb in im["neighbours"]:
            cells.append(
                _figure(
                    training_image(nb["dataset_position"]),
                    f"train {nb['dataset_position']}: {nb['similarity']:.4f}",
                )
            )
        verdict = "FLAGGED" if im["flagged"] else "passed"
        extra = "".join(
            f"<div>{html.escape(k)}: {html.escape(str(v))}</div>"
            for k, v in im.items()
            if k not in {"index", "class", "neighbours", "flagged"}
        )
        cls = "row flagged" if im["flagged"] else "row"
        body = f'<div><div class="verdict">{verdict}</div>{extra}</div>'
        return f'<div class="{cls}">{"".join(cells)}{body}</div>'

    s = report["summary"]
    summary_rows = "".join(
        f"<tr><td>{html.escape(str(k))}</td><td>{html.escape(str(v))}</td></tr>"
        for k, v in [
            ("images", s["images"]),
            ("flagged", f"{s['flagged']} ({s['flagged_fraction']:.2%})"),
            ("threshold", report["calibration"]["threshold"]),
            ("calibrated on", f"{report['calibration']['holdout_images']} held-out images"),
            ("distance-to-closest-record train share", s.get("dcr_train_share")),
            ("verdict", "PASSED" if s["passed"] else "FAILED"),
            ("policy", report["policy"]["rule"]),
        ]
    )
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>{html.escape(title)}</title><style>{STYLE}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
        f'<table class="summary">{summary_rows}</table>',
        "<p>Each row: the checked image, then its nearest training images (exact search) "
        "with their similarity. Training images are real patients' images: this page "
        "stays inside the site.</p>",
        f"<h2>Flagged ({len(flagged)})</h2>",
        *(row(im) for im in flagged),
        f"<h2>A sample of passed images ({len(passed)})</h2>",
        *(row(im) for im in passed),
        "</body></html>",
    ]
    return "\n".join(parts)


def evidence_response(page: str) -> HTMLResponse:
    """The page as an HTML response that may show its own inline images and styles only
    (no scripts, nothing fetched from anywhere), and that no browser or proxy may keep:
    it shows real training images."""
    return HTMLResponse(
        page,
        headers={
            "Content-Security-Policy": "default-src 'none'; "
            "img-src data:; style-src 'unsafe-inline'",
            "Cache-Control": "no-store",
            "Referrer-Policy": "no-referrer",
            "X-Content-Type-Options": "nosniff",
        },
    )
