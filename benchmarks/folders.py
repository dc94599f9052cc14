"""Stand-ins for other folders: a seeded subset of a dataset folder, or a copy upscaled to another resolution.

    python benchmarks/folders.py SRC OUT [--subset N] [--seed 0] [--size 512]

Writes OUT/images/ (JPEG, quality 95) and OUT/masks/ (PNG, 0/255, resized by nearest neighbour) from
SRC's pairs, read as kvseg reads them (upright, the folder's mask encoding). Used to see how the plan
and the budget behave on folders of other sizes and resolutions than the development folder; the
frames are the same, so a score on them says nothing of other hospitals or cameras.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np

from kvseg.config import DataConfig
from kvseg.data.encodings import dataset_encoding
from kvseg.data.folder import find_samples, read_image
from kvseg.data.masks import read_mask


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("src")
    parser.add_argument("out")
    parser.add_argument("--subset", type=int, help="keep N pairs, drawn by --seed")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", type=int, help="resize every pair to SIZE x SIZE")
    args = parser.parse_args(argv)
    samples = list(find_samples(args.src).values())
    if args.subset:
        order = np.random.default_rng(args.seed).permutation(len(samples))[: args.subset]
        samples = [samples[i] for i in sorted(order)]
    encoding = dataset_encoding(DataConfig(), [s.mask for s in samples])
    out = Path(args.out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "masks").mkdir(parents=True, exist_ok=True)
    for sample in samples:
        image, mask = read_image(sample.image), read_mask(sample.mask, encoding) * 255
        if args.size:
            image = cv2.resize(image, (args.size, args.size), interpolation=cv2.INTER_LINEAR)
            mask = cv2.resize(mask, (args.size, args.size), interpolation=cv2.INTER_NEAREST)
        cv2.imwrite(str(out / "images" / f"{sample.id}.jpg"), image[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, 95])
        cv2.imwrite(str(out / "masks" / f"{sample.id}.png"), mask)
    print(f"wrote {len(samples)} pairs to {out}")


if __name__ == "__main__":
    main()
