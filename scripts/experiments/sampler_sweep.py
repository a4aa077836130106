"""How a latent flow's sampler settings move TSTR and FID, on one registered generator
version.

Outside the product's jobs, on the same data they use: the version's real training images
(as the evaluation job selects them) and its held-out patients. For each setting (guidance
weight, Heun steps) it draws a class-balanced synthetic set as large as the real one, trains
the evaluation's classifier on it alone (TSTR) and scores it on the held-out films; the real
set (DS1) is trained once with the same classifier seeds. FID against the real training
films is measured in the dataset version's two quality spaces (the encoders its train jobs
registered), beside the held-out floor, as the train job does. With ``--oversample`` each
setting also reports a class-filtered draw (see the option). The images are NOT gated here
(the evaluation job leaves flagged ones out), so the figures are for choosing settings, not
for the utility tables of docs/measurements.md.

    SYNTHRAY_DEV_MODE=true SYNTHRAY_DATA_DIR=var/study-.../state .venv/bin/python \
        scripts/experiments/sampler_sweep.py --model kermany --guidance 1.5,2,3 --steps 8 \
        --interval none,0.36:0.92

Prints one line per setting and a JSON list at the end.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import time
from typing import Any

import numpy as np
import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--version", type=int, default=1)
    ap.add_argument("--guidance", default="2", help="comma list of weights")
    ap.add_argument("--steps", default="8", help="comma list of Heun steps")
    ap.add_argument(
        "--interval",
        default="none",
        help="comma list of guidance intervals t_low:t_high in flow time, or none",
    )
    ap.add_argument(
        "--setting",
        action="append",
        help="guidance/steps/interval, e.g. 2/6/0.36:0.92 or 1/6/none; repeatable; "
        "replaces the grid of the three options above",
    )
    ap.add_argument("--seeds", type=int, default=2, help="classifier seeds per setting; 0: no TSTR")
    ap.add_argument(
        "--per-class",
        type=int,
        default=None,
        help="images drawn per class (default: the real training set's size over its "
        "classes, as TSTR compares like with like); for FID alone, enough to fill the "
        "held-out set's class mix",
    )
    ap.add_argument(
        "--subsamples",
        "--eval-seeds",
        dest="subsamples",
        type=int,
        default=None,
        help="quality comparisons per setting, each on its own subsamples of the held-out "
        "and generated images (the figures are their medians, beside their range; default: "
        "the train job's, quality.SUBSAMPLES)",
    )
    ap.add_argument("--classifier-steps", type=int, default=300)
    ap.add_argument("--synthesis-seed", type=int, default=0)
    ap.add_argument(
        "--oversample",
        default="1",
        help="comma list of factors: draw the largest times the images per class once; "
        "each setting then also reports, per factor F, the first F times the images of "
        "each class filtered by class: the images to which the dataset's supervised "
        "quality classifier (trained on the real training split) gives the highest "
        "probability of the class they were drawn for",
    )
    ap.add_argument(
        "--chooser",
        default="typical",
        help="comma list of how a filtered draw keeps its images: typical (the highest "
        "probability of their class, as synthesis does), ratio-<space> (the highest "
        "estimated density ratio real / generated within their class in that quality space, "
        "supervised or self_supervised: see selection.realest; ratio2-<space>: the same with the "
        "squares of the components too)",
    )
    ap.add_argument(
        "--fresh-encoders",
        nargs="?",
        const="0",
        default=None,
        metavar="SEEDS",
        help="also train the two quality encoders anew in this process, as a train job does "
        "(quality.train_space, no time cap), once per seed of this comma list (default 0), "
        "and report every figure in each seed's spaces too (quality_fresh, by seed): how far "
        "the figures depend on the encoders' own training",
    )
    ap.add_argument(
        "--fresh-spaces",
        default=",".join(("supervised", "self_supervised")),
        help="comma list of the quality spaces whose encoders --fresh-encoders trains (the "
        "figures need the supervised one: it also scores class consistency)",
    )
    ap.add_argument(
        "--encoder-steps",
        type=int,
        default=None,
        help="training steps of each fresh encoder (default: quality_encoder_steps)",
    )
    args = ap.parse_args()

    from _version import load_version

    from synthray.app.db import session_factory
    from synthray.app.registry import service as registry
    from synthray.config import get_settings
    from synthray.models.evaluation import quality, utility
    from synthray.models.generators.files import load_generator
    from synthray.models.generators.sampling import sample_images
    from synthray.models.generators.selection import best_scored, realest

    v = load_version(args.model, args.version)
    classes, real, test_x, test_y = v.classes, v.real, v.test_x, v.test_y
    generator = load_generator(v.weights, expected_sha256=v.weights_sha256)
    n_cls = len(classes)
    per_class = args.per_class or int(np.ceil(len(real.labels) / n_cls))
    cfg = utility.ClassifierConfig(steps=args.classifier_steps)
    spaces = {}
    with session_factory(get_settings().sqlalchemy_url)() as s:
        for name, kind in (("supervised", "quality"), ("self_supervised", "quality-ssl")):
            row = registry.quality_encoder(s, v.dataset_version_id, v.resolution, kind)
            if row is not None:
                path = v.blobs.path(row.blob_sha256)
                spaces[name] = quality.load_encoder(path, expected_sha256=row.blob_sha256)
    dataset_ids = np.array([v.split.classes.index(c) for c in classes])
    m_train = np.isin(v.split.train_labels, dataset_ids)
    fresh: dict[int, dict[str, Any]] = {}
    for seed in [int(s) for s in args.fresh_encoders.split(",")] if args.fresh_encoders else []:
        t0 = time.perf_counter()
        steps = args.encoder_steps or get_settings().quality_encoder_steps
        fresh[seed] = {
            space: quality.train_space(
                space,
                v.split.train_images,
                v.split.train_labels,
                len(v.split.classes),
                max_steps=steps,
                max_seconds=float("inf"),
                seed=seed,
            ).model
            for space in args.fresh_spaces.split(",")
        }
        accuracy = ""
        if "supervised" in fresh[seed]:
            held_out = v.split.holdout_images, v.split.holdout_labels
            acc = quality.accuracy(fresh[seed]["supervised"], *held_out)
            accuracy = f", supervised held-out accuracy {acc:.3f}"
        print(
            f"fresh encoders, seed {seed}: {steps} steps each{accuracy} "
            f"({time.perf_counter() - t0:.0f} s)",
            flush=True,
        )

    def quality_of(x: np.ndarray, y: np.ndarray, spaces: dict[str, Any] = spaces) -> dict[str, Any]:
        """Per space, the generated FID beside the held-out floor against every real
        training film (medians over ``--subsamples`` comparisons on other subsamples), the
        ratio's median and range, the per-class pairs, and the class consistency."""
        if "supervised" not in spaces:
            return {}
        out = quality.evaluate(
            spaces,
            spaces["supervised"],
            v.split.train_images[m_train],
            v.split.train_labels[m_train],
            v.test_x,
            dataset_ids[v.test_y],
            x,
            dataset_ids[y],
            list(v.split.classes),
            subsamples=args.subsamples or quality.SUBSAMPLES,
        )
        figures: dict[str, Any] = {
            "compared_images": out["compared_images"],
            "subsamples": out["subsamples"],
            "class_consistency": out["class_consistency"]["generated"],
        }
        for name, sp in out["spaces"].items():
            figures[name] = {
                side: sp["overall"][side]["fid"] for side in ("generated", "floor")
            } | {
                "range": [sp["spread"]["generated"]["fid"], sp["spread"]["floor"]["fid"]],
                "ratio": sp["spread"]["fid_ratio"],
                "per_class": {
                    c: [pc["generated"]["fid"], pc["floor"]["fid"]]
                    for c, pc in sp["per_class"].items()
                },
            }
            if "as_drawn" in sp:
                figures[name]["as_drawn"] = sp["as_drawn"]["generated"]["fid"]
        return figures

    def score(images: np.ndarray, labels: np.ndarray) -> tuple[list[float], list[float]]:
        """Balanced accuracy per classifier seed, and the per-class recall of the mean."""
        if args.seeds == 0:
            return [float("nan")], []
        bal, recall = [], []
        for seed in range(args.seeds):
            arm = utility.ArmSet(images, labels, np.zeros(len(labels), bool), False, None)
            model = utility.train_classifier(arm, n_cls, cfg, seed)
            proba = utility.predict_proba(model, test_x)
            _, b, _, r = utility.classification_scores(test_y, proba, n_cls)
            bal.append(b)
            recall.append(r)
        return bal, [round(float(v), 3) for v in np.mean(recall, axis=0)]

    rows = []
    t0 = time.perf_counter()
    ds1, ds1_recall = score(real.images, real.labels)
    if args.seeds:
        print(
            f"DS1 balanced accuracy {np.mean(ds1):.3f} {ds1}, recall {ds1_recall} "
            f"({time.perf_counter() - t0:.0f} s)"
        )
    grid = itertools.product(
        args.guidance.split(","), args.steps.split(","), args.interval.split(",")
    )
    chosen = [one.split("/") for one in args.setting] if args.setting else grid
    settings = [(float(w), int(steps), interval) for w, steps, interval in chosen]
    for w, steps, interval in settings:
        g = copy.deepcopy(generator)
        g.cfg.guidance, g.cfg.class_guidance, g.cfg.sample_steps = w, None, steps
        g.cfg.guidance_interval = (
            None if interval == "none" else [float(t) for t in interval.split(":")]
        )
        factors = sorted(float(f) for f in args.oversample.split(","))
        drawn = int(np.ceil(per_class * factors[-1]))
        t0 = time.perf_counter()
        x, y = sample_images(g, dict.fromkeys(range(n_cls), drawn), seed=args.synthesis_seed)
        t_sample = time.perf_counter() - t0
        selections = {
            "first": np.concatenate([np.flatnonzero(y == c)[:per_class] for c in range(n_cls)])
        }
        if drawn > per_class and "supervised" in spaces:
            own = quality.probabilities(spaces["supervised"], x)[np.arange(len(y)), dataset_ids[y]]
            for f in (f for f in factors if f > 1):
                # The first F x per_class images of each class, chosen as synthesis does.
                first = np.concatenate(
                    [np.flatnonzero(y == c)[: int(np.ceil(per_class * f))] for c in range(n_cls)]
                )
                want = dict.fromkeys(range(n_cls), per_class)
                for how in args.chooser.split(","):
                    if how == "typical":
                        chosen = best_scored(own[first], y[first], want)
                        selections[f"filtered x{f:g}"] = first[chosen]
                        continue
                    kind, _, name = how.partition("-")
                    space = spaces[name]
                    real_f = quality.features(space, real.images)
                    gen_f = quality.features(space, x[first])
                    ratio = np.zeros(len(first))
                    for c in range(n_cls):
                        mine = y[first] == c
                        ratio[mine] = realest(
                            real_f[real.labels == c], gen_f[mine], c, squares=kind == "ratio2"
                        )
                    chosen = best_scored(ratio, y[first], want)
                    selections[f"{how} x{f:g}"] = first[chosen]
        for selection, keep in selections.items():
            tstr, recall = score(x[keep], y[keep])
            row = {
                "guidance": w,
                "sample_steps": steps,
                "guidance_interval": g.cfg.guidance_interval,
                "selection": selection,
                "drawn_per_class": drawn,
                "tstr": [round(v, 4) for v in tstr],
                "tstr_mean": round(float(np.mean(tstr)), 4),
                "ds1_mean": round(float(np.mean(ds1)), 4),
                "ratio": round(float(np.mean(tstr) / np.mean(ds1)), 3),
                "recall": recall,
                "images_per_s": round(len(x) / t_sample, 1),
                # For the filtered set the class consistency is that of the filter itself.
                "quality": quality_of(x[keep], y[keep]),
            }
            if fresh:
                row["quality_fresh"] = {
                    seed: quality_of(x[keep], y[keep], spaces) for seed, spaces in fresh.items()
                }
            rows.append(row)
            print(json.dumps(row), flush=True)
    print(json.dumps(rows))


if __name__ == "__main__":
    torch.set_num_threads(2)
    main()
