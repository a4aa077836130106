"""Exact 1-NN search: ours (synthray.models.gate.search) against faiss IndexFlatIP, same data,
same run.

Two cases, each 10,000 queries against 100,000 reference vectors by default:

- 512-d: random-normal vectors, L2-normalised (the shape of a learned embedding);
- 4096-d: 64x64 pixel vectors (mean-centred, normalised: the inner product is the Pearson
  correlation) built from the 1,000 real NIH radiographs, each reference and query a copy of one
  of them with Gaussian noise (sigma 2-8 grey levels) and a small brightness/contrast change.
  Every query therefore has about 100 near-identical references: the hardest case for an exact
  search, and the realistic one for a memorization check. Random vectors if the images are
  missing.

For each case it times index build plus search for both, counts queries whose neighbour differs,
and decides each difference with fp64 scores (ties go to the lower index, as numpy.argmax). A
random subset of queries (``--check``) is also compared with a brute-force fp64 search.
Prints a table, then one JSON line. Target: ours >= 1.5 x faiss in both cases. The pixel
vectors are shortlisted in a subspace (its rank is printed; see synthray.models.gate.search);
the random 512-d vectors have none to offer, so there every score costs a full multiply-add per
dimension on both sides, and without bf16 units the ratio is bounded by matmul speed alone.
Usage: python benchmarks/nn_search.py [--queries 10000] [--refs 100000] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]


def _normalise(x: np.ndarray) -> np.ndarray:
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def _random_case(n_q: int, n_r: int, d: int, rng: np.random.Generator) -> tuple:
    refs = _normalise(rng.standard_normal((n_r, d), dtype=np.float32))
    queries = _normalise(rng.standard_normal((n_q, d), dtype=np.float32))
    return queries, refs


def _load_nih(folder: Path) -> np.ndarray | None:
    from PIL import Image

    files = sorted((folder / "images").glob("*.png"))
    if not files:
        return None
    out = []
    for f in files:
        with Image.open(f) as im:
            out.append(np.asarray(im.convert("L"), dtype=np.uint8))
    return np.stack(out)  # (N, 64, 64)


def _jittered(base: np.ndarray, pick: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Pixel features of noisy, brightness/contrast-jittered copies of base[pick]."""
    from synthray.models.gate.memorization import pixel_features

    out = np.empty((len(pick), base.shape[1] * base.shape[2]), dtype=np.float32)
    for s in range(0, len(pick), 8192):
        p = pick[s : s + 8192]
        img = base[p].astype(np.float32)  # (c, R, R)
        gain = rng.uniform(0.9, 1.1, size=(len(p), 1, 1)).astype(np.float32)
        shift = rng.uniform(-10, 10, size=(len(p), 1, 1)).astype(np.float32)
        sigma = rng.uniform(2, 8, size=(len(p), 1, 1)).astype(np.float32)
        img = img * gain + shift + sigma * rng.standard_normal(img.shape, dtype=np.float32)
        out[s : s + len(p)] = pixel_features(np.clip(img, 0, 255).round().astype(np.uint8))
    return out


def _pixel_case(n_q: int, n_r: int, data: Path, rng: np.random.Generator) -> tuple:
    base = _load_nih(data)
    if base is None:
        q, r = _random_case(n_q, n_r, 4096, rng)
        return q, r, "random (images not found)"
    refs = _jittered(base, np.arange(n_r) % len(base), rng)
    queries = _jittered(base, rng.integers(0, len(base), n_q), rng)
    return queries, refs, f"{len(base)} NIH images x {n_r // len(base)} noisy copies"


def _fp64_scores(q: np.ndarray, r: np.ndarray, qi: np.ndarray, ri: np.ndarray) -> np.ndarray:
    return np.einsum("nd,nd->n", q[qi].astype(np.float64), r[ri].astype(np.float64))


def _run_case(queries: np.ndarray, refs: np.ndarray, n_check: int, seed: int) -> dict:
    import faiss

    from synthray.models.gate.search import ExactIndex, SearchStats

    t0 = time.perf_counter()
    index = faiss.IndexFlatIP(refs.shape[1])
    index.add(refs)
    _, f_idx = index.search(queries, 1)
    faiss_s = time.perf_counter() - t0
    del index

    stats = SearchStats()
    t0 = time.perf_counter()
    ours = ExactIndex(refs, "ip")
    build_s = time.perf_counter() - t0
    _, o_idx = ours.search(queries, 1, stats=stats)
    ours_s = time.perf_counter() - t0
    rank = ours.subspace_rank
    del ours

    f_idx, o_idx = f_idx[:, 0], o_idx[:, 0]
    diff = np.flatnonzero(f_idx != o_idx)
    f_sc = _fp64_scores(queries, refs, diff, f_idx[diff])
    o_sc = _fp64_scores(queries, refs, diff, o_idx[diff])
    ours_right = (o_sc > f_sc) | ((o_sc == f_sc) & (o_idx[diff] < f_idx[diff]))

    # Brute-force fp64 on a random subset of queries.
    check = np.random.default_rng(seed).choice(len(queries), min(n_check, len(queries)), False)
    best = np.empty(len(check), dtype=np.int64)
    r64 = torch.from_numpy(refs)
    for s in range(0, len(check), 50):
        q64 = torch.from_numpy(queries[check[s : s + 50]]).double()
        scores = torch.cat(
            [q64 @ r64[c : c + 20000].double().T for c in range(0, len(refs), 20000)], 1
        )
        best[s : s + 50] = scores.numpy().argmax(1)
    return {
        "subspace_rank": rank,
        "faiss_s": faiss_s,
        "ours_s": ours_s,
        "build_s": build_s,
        "mismatches": len(diff),
        "ours_right": int(ours_right.sum()),
        "faiss_right": int((~ours_right).sum()),
        "checked": len(check),
        "ours_fp64_errors": int((o_idx[check] != best).sum()),
        "faiss_fp64_errors": int((f_idx[check] != best).sum()),
        "certified": stats.certified,
        "near_ties": stats.near_ties,
        "near_tie_pairs": stats.near_tie_pairs,
        "fp64_pairs": stats.fp64_pairs,
        "exact_blocks": stats.exact_blocks,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--queries", type=int, default=10_000)
    ap.add_argument("--refs", type=int, default=100_000)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--check", type=int, default=200, help="queries checked by fp64 brute force")
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared/data/nih-cxr14-64")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    import faiss

    from synthray.models.runtime import cpu_compute_dtype

    faiss.omp_set_num_threads(args.threads)
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(args.seed)

    t0 = time.perf_counter()
    q512, r512 = _random_case(args.queries, args.refs, 512, rng)
    q4096, r4096, source = _pixel_case(args.queries, args.refs, args.data, rng)
    print(f"built the data in {time.perf_counter() - t0:.0f} s; 4096-d: {source}")
    results = {}
    for name, q, r in (("512-d normal", q512, r512), ("4096-d pixels", q4096, r4096)):
        results[name] = _run_case(q, r, args.check, args.seed)
        del q, r

    head = f"{'case':15}{'faiss q/s':>10}{'ours q/s':>10}{'ratio':>7}{'build s':>8}{'rank':>6}"
    head += f"{'mismatch':>9}{'ours ok':>8}{'fp64 err o/f':>13}{'near-tie q':>11}{'pairs':>9}"
    print(head)
    for name, r in results.items():
        n = args.queries
        print(
            f"{name:15}{n / r['faiss_s']:>10.0f}{n / r['ours_s']:>10.0f}"
            f"{r['faiss_s'] / r['ours_s']:>7.2f}{r['build_s']:>8.2f}{r['subspace_rank']:>6}"
            f"{r['mismatches']:>9}"
            f"{r['ours_right']:>8}{r['ours_fp64_errors']:>7}/{r['faiss_fp64_errors']:<5}"
            f"{r['near_ties']:>11}{r['near_tie_pairs']:>9}"
        )
    print(
        f"{args.queries} queries x {args.refs} refs, {args.threads} threads, cores: "
        f"{os.cpu_count()}; times include index build; 'ours ok' = mismatches where fp64 "
        f"agrees with ours; fp64 err = wrong top-1 among {args.check} brute-force-checked queries; "
        f"rank = directions of the shortlist's subspace (0: full vectors); bf16 shortlist: "
        f"{cpu_compute_dtype() == torch.bfloat16}"
    )
    a, b = results["512-d normal"], results["4096-d pixels"]
    n = args.queries
    print(
        json.dumps(
            {
                "benchmark": "nn_search",
                "value": round(n / a["ours_s"], 1),
                "unit": "queries/s",
                "reference": "faiss IndexFlatIP",
                "reference_value": round(n / a["faiss_s"], 1),
                "ratio": round(a["faiss_s"] / a["ours_s"], 3),
                "target": 1.5,
                "mismatches": a["mismatches"],
                "mismatches_ours_right": a["ours_right"],
                "value_4096": round(n / b["ours_s"], 1),
                "reference_value_4096": round(n / b["faiss_s"], 1),
                "ratio_4096": round(b["faiss_s"] / b["ours_s"], 3),
                "subspace_rank_4096": b["subspace_rank"],
                "mismatches_4096": b["mismatches"],
                "mismatches_4096_ours_right": b["ours_right"],
                "fp64_errors_ours": a["ours_fp64_errors"] + b["ours_fp64_errors"],
                "fp64_errors_faiss": a["faiss_fp64_errors"] + b["faiss_fp64_errors"],
                "pixels": source,
                "queries": n,
                "refs": args.refs,
                "threads": args.threads,
            }
        )
    )


if __name__ == "__main__":
    main()
