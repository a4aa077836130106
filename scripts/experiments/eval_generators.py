"""Score saved generators in the in-house encoder space (see synthray.models.quality).

    .venv/bin/python scripts/experiments/eval_generators.py /tmp/compare_*_generator.safetensors

An encoder is trained once on the NIH demo training split (cached next to --cache) and each
generator's 100 samples per class get: FID against the training images (with the held-out
floor beside it), and the share of each class's samples that the encoder assigns to that class
(class fidelity; on the real held-out images this accuracy is printed as the reference).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from nih_data import load_split

from synthray.models import quality
from synthray.models.sampling import sample_images
from synthray.models.training import load_generator


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("generators", nargs="+", type=Path)
    ap.add_argument("--cache", type=Path, default=Path("/tmp/compare_encoder.safetensors"))
    ap.add_argument("--per-class", type=int, default=100)
    args = ap.parse_args()

    split = load_split()
    c = len(split.classes)
    cfg = quality.EncoderConfig(resolution=split.train_images.shape[1], num_classes=c)
    sha_file = args.cache.with_suffix(".sha256")
    if args.cache.exists() and sha_file.exists():
        encoder = quality.load_encoder(args.cache, sha_file.read_text().strip())
    else:
        encoder = quality.train_encoder(split.train_images, split.train_labels, cfg)
        sha_file.write_text(quality.save_encoder(args.cache, encoder))
    f_train = quality.features(encoder, split.train_images)
    f_hold = quality.features(encoder, split.holdout_images)
    acc = quality.accuracy(encoder, split.holdout_images, split.holdout_labels)
    print(
        f"encoder held-out accuracy {acc:.2f}; "
        f"FID floor (held-out vs train) {quality.fid(f_train, f_hold):.2f}"
    )
    print(
        f"{'generator':40s} {'FID':>7s}  class fidelity " + " ".join(n[:6] for n in split.classes)
    )
    for path in args.generators:
        generator = load_generator(path, None)
        images, labels = sample_images(
            generator, dict.fromkeys(range(c), args.per_class), seed=0, device="cpu"
        )
        f_fake = quality.features(encoder, images)
        fidelity = [
            quality.accuracy(encoder, images[labels == k], labels[labels == k]) for k in range(c)
        ]
        print(
            f"{path.name:40s} {quality.fid(f_train, f_fake):7.2f}  "
            + " ".join(f"{x:6.2f}" for x in fidelity)
        )


if __name__ == "__main__":
    main()
