"""Write a manifest of ../shared/data/busi with one subgroup column, so the BUSI evidence grid
(configs/busi_evidence.yaml, issue 16) can show its subgroup table on real images.

    python benchmarks/busi_manifest.py            # writes results/busi_manifest.csv

BUSI's public release has no patient, device or demographic columns, and this copy is resized to
256 x 256, so the original image size (which differs between the two scanners used) is gone too.
The column written here is therefore an acquisition proxy measured from the pixels, and says so in
its name: `brightness`, the tertile (dark / mid / bright) of each image's mean grey level, which
follows the scanner's gain and depth settings. It is not a clinical subgroup, and it is not
independent of the class (normal tissue scans differ in brightness), so read its table as a
check of the machinery and of acquisition sensitivity, not as a fairness result. The images stay
where they are: the manifest holds paths relative to the BUSI folder, which the config names as
the manifest's `options: {root: ...}`.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
BANDS = ("dark", "mid", "bright")


def mean_grey(path: Path) -> float:
    with Image.open(path) as im:
        return float(np.asarray(im.convert("L"), dtype=np.float32).mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "busi")
    ap.add_argument("--out", type=Path, default=ROOT / "results" / "busi_manifest.csv")
    args = ap.parse_args()
    if not args.data.is_dir():
        raise SystemExit(f"{args.data}: no such folder; pass --data pointing at BUSI (benign/ malignant/ normal/).")
    images = sorted((label.name, p) for label in sorted(args.data.iterdir()) if label.is_dir()
                    for p in sorted(label.glob("*.png")))
    grey = np.asarray([mean_grey(p) for _, p in images])
    cuts = np.quantile(grey, [1 / 3, 2 / 3])
    band = np.digitize(grey, cuts)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "label", "brightness"])
        for (label, p), b in zip(images, band):
            w.writerow([p.relative_to(args.data).as_posix(), label, BANDS[b]])
    counts = {BANDS[b]: int((band == b).sum()) for b in range(3)}
    print(f"{args.out}: {len(images)} images; brightness tertiles at mean grey {cuts[0]:.1f} / {cuts[1]:.1f}: {counts}")


if __name__ == "__main__":
    main()
