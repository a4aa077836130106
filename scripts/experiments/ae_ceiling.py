"""How much of TSTR's gap can the latent flow's autoencoder explain?

A latent generator can at best reproduce its autoencoder's reconstructions. This trains the
latent flow's autoencoder phase alone (the product's own ``FlowTrainer`` steps, for the
seconds a full run with the given budget would give it), reconstructs the real training
images, trains the evaluation's classifier on the reconstructions (TRTR-recon) and scores it
on the real held-out films, beside the same classifier on the real images (DS1). If
TRTR-recon is near DS1, the flow is what loses the class content; if it is near TSTR, the
autoencoder is.

    SYNTHRAY_DEV_MODE=true SYNTHRAY_DATA_DIR=var/study-.../state .venv/bin/python \
        scripts/experiments/ae_ceiling.py --dataset kermany --resolution 128 \
        --classes normal,bacteria,virus --ae-seconds 450 \
        --variants "latent_channels=4;latent_channels=8"

The dataset must be ingested at that resolution (``synthray ingest ... --resolutions``).

Each variant is a ';'-separated item of comma-separated TrainConfig overrides. Prints one
JSON line per variant and a JSON list at the end.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch


@torch.no_grad()
def reconstruct(trainer: object, images: np.ndarray) -> np.ndarray:
    """uint8 (N, R, R) -> the trainer's autoencoder's reconstructions, uint8 (N, R, R)."""
    out = []
    for i in range(0, len(images), 128):
        x = trainer._images(np.arange(i, min(i + 128, len(images))))  # type: ignore[attr-defined]
        with trainer.autocast():  # type: ignore[attr-defined]
            r = trainer.ae(x).float().clamp(-1, 1)  # type: ignore[attr-defined]
        out.append(((r[:, 0] + 1) * 127.5).round().to(torch.uint8).numpy())
    return np.concatenate(out)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dataset", required=True)
    ap.add_argument("--version", type=int, default=None, help="dataset version (latest)")
    ap.add_argument("--resolution", type=int, default=128)
    ap.add_argument("--classes", required=True, help="comma-separated class names")
    ap.add_argument("--ae-seconds", type=float, default=450.0)
    ap.add_argument("--variants", default="", help="';'-separated override lists")
    ap.add_argument("--seeds", type=int, default=2, help="classifier seeds")
    ap.add_argument("--classifier-steps", type=int, default=300)
    args = ap.parse_args()

    from _version import load_films, parse_variant

    from synthray.models.evaluation import utility
    from synthray.models.generators.config import TrainConfig
    from synthray.models.generators.flow_trainer import FLOW, FlowTrainer
    from synthray.models.runtime import resolve_precision

    classes = [c for c in args.classes.split(",") if c]
    resolution = args.resolution
    films = load_films(args.dataset, args.version, resolution, classes)
    real, test_x, test_y = films.real, films.test_x, films.test_y
    n_cls = len(classes)
    ccfg = utility.ClassifierConfig(steps=args.classifier_steps)
    device = torch.device("cpu")
    precision = resolve_precision("auto", device)

    def score(images: np.ndarray, labels: np.ndarray) -> tuple[list[float], list[float]]:
        bal, recall = [], []
        for seed in range(args.seeds):
            arm = utility.ArmSet(images, labels, np.zeros(len(labels), bool), False, None)
            model = utility.train_classifier(arm, n_cls, ccfg, seed)
            _, b, _, r = utility.classification_scores(
                test_y, utility.predict_proba(model, test_x), n_cls
            )
            bal.append(round(b, 4))
            recall.append(r)
        return bal, [round(float(v), 3) for v in np.mean(recall, axis=0)]

    t0 = time.perf_counter()
    ds1, ds1_recall = score(real.images, real.labels)
    print(f"DS1 {ds1} recall {ds1_recall} ({time.perf_counter() - t0:.0f} s)", flush=True)

    rows = []
    for text in args.variants.split(";") if args.variants else [""]:
        overrides = parse_variant(text)
        fraction = float(overrides.pop("ae_fraction", 0.25))  # type: ignore[arg-type]
        cfg = TrainConfig(
            architecture="latentflow",
            resolution=resolution,
            class_names=classes,
            max_seconds=args.ae_seconds / fraction,
            ae_fraction=fraction,
            precision=precision,
            **overrides,  # type: ignore[arg-type]
        )
        trainer = FlowTrainer(real.images, real.labels, cfg, device, precision)
        trainer.set_train_mode()
        start = time.perf_counter()
        while trainer.stage != FLOW:
            trainer.train_step(time.perf_counter() - start)
        ae_s = time.perf_counter() - start
        trainer.ae.eval()

        recon = reconstruct(trainer, real.images)
        err = np.abs(recon.astype(np.float32) - real.images.astype(np.float32)).mean() / 127.5
        bal, recall = score(recon, real.labels)
        result = {
            "variant": text or "defaults",
            "ae_steps": trainer.ae_steps,
            "ae_seconds": round(ae_s),
            "train_l1": round(float(err), 4),
            "trtr_recon": bal,
            "trtr_recon_mean": round(float(np.mean(bal)), 4),
            "ds1_mean": round(float(np.mean(ds1)), 4),
            "ratio": round(float(np.mean(bal) / np.mean(ds1)), 3),
            "recall": recall,
        }
        rows.append(result)
        print(json.dumps(result), flush=True)
    print(json.dumps(rows))


if __name__ == "__main__":
    torch.set_num_threads(2)
    main()
