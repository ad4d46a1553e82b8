"""Data quality before training: what is in the folder, what cannot be read, what is duplicated.

Near-duplicates (the same lesion re-exported, cropped a little, or with a burnt-in caliper) leak
across folds just as exact copies do, and exact content hashes miss them. A 64-bit perceptual
hash (`imagehash.phash`, a DCT of the 32x32 grey image) changes little under such edits, so
images whose hashes differ in at most `threshold` bits are put in one group. The same grouping
serves `medtune data check` (a report) and `splits.apply_duplicate_policy` (`near_duplicates:`).
"""

from __future__ import annotations

import hashlib
import io
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from medtune.errors import DataError

DEFAULT_NEAR_THRESHOLD = 8  # bits of 64; on BUSI re-exported frames sit at 0-8, other frames of a patient at 10+


# --------------------------------------------------------------------------- hashing and grouping
def phash_bits(img: Image.Image | np.ndarray | torch.Tensor) -> np.ndarray:
    """64 booleans: the perceptual hash of one image (PIL image, or uint8 (3, H, W) array)."""
    try:
        import imagehash
    except ImportError as exc:
        raise DataError("near-duplicate search needs the `imagehash` package: pip install 'medtune[data]' "
                        "(or use --exact-only / drop near_duplicates).") from exc
    if not isinstance(img, Image.Image):
        arr = np.asarray(img, dtype=np.uint8)
        img = Image.fromarray(arr.transpose(1, 2, 0) if arr.ndim == 3 and arr.shape[0] in (1, 3) else arr)
    return np.asarray(imagehash.phash(img).hash, dtype=bool).reshape(-1)


def table_phashes(images: torch.Tensor) -> np.ndarray:
    """(N, 64) perceptual hashes of a uint8 (N, 3, H, W) image tensor."""
    return np.stack([phash_bits(im.numpy()) for im in images]) if len(images) else np.zeros((0, 64), bool)


def union_groups(n: int, pairs) -> list[list[int]]:
    """Connected components (size > 1) of the graph on 0..n-1 with edges `pairs`."""
    parent = list(range(n))

    def find(a: int) -> int:
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    for a, b in pairs:
        ra, rb = find(int(a)), find(int(b))
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    comps: dict[int, list[int]] = {}
    for i in range(n):
        comps.setdefault(find(i), []).append(i)
    return [g for g in comps.values() if len(g) > 1]


def near_duplicate_groups(bits: np.ndarray, threshold: int, chunk: int = 1024) -> list[list[int]]:
    """Groups of images whose perceptual hashes are within `threshold` bits (transitively).
    Hamming distances by matrix products, in row chunks so 10^4 images stay in memory."""
    if threshold < 0:
        raise DataError(f"near-duplicate threshold {threshold} must be >= 0 (bits of a 64-bit hash).")
    b = bits.astype(np.float32)
    nb = 1.0 - b
    pairs = []
    for s in range(0, len(b), chunk):
        d = b[s:s + chunk] @ nb.T + nb[s:s + chunk] @ b.T
        rows, cols = np.nonzero(d <= threshold + 0.5)
        keep = cols > rows + s
        pairs += list(zip(rows[keep] + s, cols[keep]))
    return union_groups(len(b), pairs)


def exact_groups(digests: list[str]) -> list[list[int]]:
    by: dict[str, list[int]] = {}
    for i, d in enumerate(digests):
        by.setdefault(d, []).append(i)
    return [g for g in by.values() if len(g) > 1]


def straddling(groups: list[list[int]], folds: list[tuple[np.ndarray, np.ndarray]]) -> int:
    """How many groups have members in both the training and the test side of at least one fold."""
    n = 0
    for g in groups:
        for _, test in folds:
            inside = np.isin(g, test)
            if inside.any() and not inside.all():
                n += 1
                break
    return n


# --------------------------------------------------------------------------- the report
@dataclass
class FileInfo:
    path: str
    label: int
    size: tuple[int, int] | None = None
    mode: str | None = None
    digest: str | None = None
    phash: np.ndarray | None = None
    error: str | None = None
    blank: bool = False


def inspect_file(path: str | Path, label: int, max_pixels: int) -> FileInfo:
    """Size and mode as stored (before any resize), a pixel digest and a perceptual hash; a file
    that cannot be decoded gets its error text instead of raising."""
    from medtune.data.loaders import decode_image, to_rgb, upright

    info = FileInfo(str(path), label)
    try:
        decode_image(path, 8, max_pixels, strict=True)  # the loader's own checks and error texts
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            img = Image.open(io.BytesIO(Path(path).read_bytes()))
            info.size, info.mode = img.size, img.mode
            rgb = to_rgb(upright(img))
    except DataError as exc:
        info.error = str(exc)
        return info
    arr = np.asarray(rgb)
    info.blank = bool(arr.min() == arr.max())
    info.digest = hashlib.sha1(repr(arr.shape).encode() + arr.tobytes()).hexdigest()
    info.phash = phash_bits(rgb)
    return info


@dataclass
class QualityReport:
    name: str
    class_names: list[str]
    files: list[FileInfo]
    threshold: int | None
    n_folds: int
    exact: list[list[int]] = field(default_factory=list)
    near: list[list[int]] = field(default_factory=list)
    exact_straddling: int = 0
    near_straddling: int = 0
    grouped_by_patient: bool = False
    official: bool = False  # the plan is the source's own train/val vs test split, not k folds
    split: list[str] | None = None  # each file's official split (MedMNIST), to name cross-split copies
    warnings: list[str] = field(default_factory=list)  # usable data, worth a look (exit status 0)
    manifest_conflicts: list[str] = field(default_factory=list)  # one file, two labels or patients

    @property
    def readable(self) -> list[int]:
        return [i for i, f in enumerate(self.files) if f.error is None]

    def conflicts(self, groups: list[list[int]]) -> list[list[int]]:
        return [g for g in groups if len({self.files[i].label for i in g}) > 1]

    def across_splits(self, groups: list[list[int]]) -> list[list[int]]:
        """Groups with copies in both train/val and test of the official split (a leak for `split: official`)."""
        if self.split is None:
            return []
        return [g for g in groups if len({self.split[i] == "test" for i in g}) > 1]

    @property
    def failed(self) -> bool:
        """What `run` would refuse or learn wrongly from: unusable files, contradictory manifest rows,
        identical images with different labels. Near duplicates are a perceptual guess, so their
        label conflicts are listed without failing the check."""
        return bool(len(self.readable) < len(self.files) or self.manifest_conflicts or self.conflicts(self.exact))

    def summary(self) -> dict:
        counts = Counter(self.class_names[f.label] for f in self.files)
        return {
            "dataset": self.name, "n_files": len(self.files), "unreadable": len(self.files) - len(self.readable),
            "class_counts": {c: counts.get(c, 0) for c in self.class_names},
            "sizes": dict(Counter(f"{f.size[0]}x{f.size[1]}" for f in self.files if f.size).most_common(5)),
            "modes": dict(Counter(f.mode for f in self.files if f.mode)),
            "exact_groups": len(self.exact), "exact_extra_images": sum(len(g) - 1 for g in self.exact),
            "exact_label_conflicts": len(self.conflicts(self.exact)),
            "near_threshold": self.threshold, "near_groups": len(self.near),
            "near_extra_images": sum(len(g) - 1 for g in self.near),
            "near_label_conflicts": len(self.conflicts(self.near)),
            "folds": self.n_folds, "grouped_by_patient": self.grouped_by_patient,
            "exact_groups_straddling_folds": self.exact_straddling,
            "near_groups_straddling_folds": self.near_straddling,
            "official_split": self.official,
            "exact_groups_across_splits": len(self.across_splits(self.exact)),
            "near_groups_across_splits": len(self.across_splits(self.near)),
            "manifest_conflicts": self.manifest_conflicts, "warnings": self.warnings, "failed": self.failed,
        }


def check_files(paths: list[str], labels: list[int], class_names: list[str], n_folds: int = 5,
                threshold: int | None = DEFAULT_NEAR_THRESHOLD, groups: np.ndarray | None = None,
                name: str = "dataset", max_pixels: int | None = None, seed: int = 0) -> QualityReport:
    """Inspect every file, group exact and near duplicates, and count how many groups the planned
    folds (patient-grouped if `groups`, duplicates ignored) would split across train and test."""
    from concurrent.futures import ThreadPoolExecutor

    from medtune.data.loaders import DEFAULT_MAX_PIXELS
    from medtune.data.folds import kfold

    mp = max_pixels or DEFAULT_MAX_PIXELS
    with ThreadPoolExecutor(max_workers=4) as pool:
        files = list(pool.map(lambda a: inspect_file(a[0], int(a[1]), mp), zip(paths, labels)))
    report = QualityReport(name, class_names, files, threshold, n_folds, grouped_by_patient=groups is not None)
    blank = [f.path for f in files if f.blank]
    if blank:
        from medtune.data.loaders import blank_warning

        report.warnings.append(blank_warning(blank))
    ok = report.readable
    report.exact = [[ok[i] for i in g] for g in exact_groups([files[i].digest for i in ok])]
    if threshold is not None and ok:
        report.near = [[ok[i] for i in g] for g in near_duplicate_groups(np.stack([files[i].phash for i in ok]),
                                                                         threshold)]
    y = np.asarray([files[i].label for i in ok])
    g = None if groups is None else np.asarray(groups)[ok]
    counts = np.bincount(y, minlength=len(class_names)) if len(y) else np.zeros(1, int)
    if len(y) and counts.min() >= n_folds:
        folds = kfold(y, g, n_folds, seed)
        pos = {j: k for k, j in enumerate(ok)}
        local = lambda gs: [[pos[i] for i in grp] for grp in gs]  # noqa: E731
        report.exact_straddling = straddling(local(report.exact), folds)
        report.near_straddling = straddling(local(report.near), folds)
    return report


def check_table(table, n_folds: int = 5, threshold: int | None = DEFAULT_NEAR_THRESHOLD, seed: int = 0,
                official: bool = False) -> QualityReport:
    """The same report for an in-memory table (synthetic, .npz): sizes are the decoded ones. With
    `official` the plan is the table's own split (train+val vs test), as `run` uses it."""
    from medtune.data.folds import kfold

    h, w = table.images.shape[-2:]
    files = [FileInfo(p, int(y), (int(w), int(h)), "RGB", d)
             for p, y, d in zip(table.paths, table.labels, table.digests)]
    report = QualityReport(table.name, table.class_names, files, threshold, 1 if official else n_folds,
                           grouped_by_patient=table.groups is not None, official=official,
                           split=None if table.split is None else [str(s) for s in table.split])
    report.exact = exact_groups(table.digests)
    if threshold is not None:
        report.near = near_duplicate_groups(table_phashes(table.images), threshold)
    if official:
        report.exact_straddling = len(report.across_splits(report.exact))
        report.near_straddling = len(report.across_splits(report.near))
    elif np.bincount(table.labels).min() >= n_folds:
        folds = kfold(table.labels, table.groups, n_folds, seed)
        report.exact_straddling = straddling(report.exact, folds)
        report.near_straddling = straddling(report.near, folds)
    return report


def check_targets(target: str | Path, n_folds: int | None = None, threshold: int | None = DEFAULT_NEAR_THRESHOLD,
                  group_pattern: str | None = None) -> list[QualityReport]:
    """`medtune data check TARGET`: a folder, a .csv manifest, or an experiment YAML."""
    from medtune.data.loaders import load_dataset

    target = Path(target)
    if target.suffix.lower() in (".yaml", ".yml"):
        from medtune.models.backbones import default_image_size
        from medtune.config import load_config

        cfg = load_config(target)
        k = n_folds or cfg.folds
        size = cfg.backbones[0].image_size or default_image_size(cfg.backbones[0].name)
        reports = []
        for ds in cfg.datasets:
            t = ds.near_duplicates if ds.near_duplicates is not None else threshold
            source = ds.source
            if source == "auto" and ds.path:
                suffix = ds.path.lower()
                source = "manifest" if suffix.endswith(".csv") else "npz" if suffix.endswith(".npz") else "folder"
            if source in ("folder", "manifest"):
                reports.append(_check_path(Path(ds.path), k, t, ds.group_pattern, ds.display_name(),
                                           ds.options.get("max_pixels"), ds.options.get("classes"),
                                           ds.options.get("root")))
            else:
                options = dict(ds.options)
                split = options.pop("split", "merged")  # read by `run`'s fold planning, not by the loader
                if split not in ("official", "merged"):
                    raise DataError(f"data set {ds.display_name()!r}: options.split must be official or merged, "
                                    f"not {split!r}.")
                if split == "official" and source not in ("npz", "medmnist"):
                    raise DataError(f"data set {ds.display_name()!r}: `split: official` needs a source with its own "
                                    "train/test split (a MedMNIST .npz); use `split: merged` for k-fold CV.")
                if ds.group_pattern:
                    options["group_pattern"] = ds.group_pattern
                table = load_dataset(ds.path, source=ds.source, image_size=size, name=ds.display_name(), **options)
                reports.append(check_table(table, k, t, official=split == "official"))
        return reports
    if not target.exists():
        raise DataError(f"{target} does not exist; give a data folder, a .csv manifest, a MedMNIST .npz or an "
                        "experiment .yaml.")
    if target.suffix.lower() == ".npz":
        return [check_table(load_dataset(target, source="npz", image_size=None), n_folds or 5, threshold)]
    name = target.stem if target.is_file() else target.name
    return [_check_path(target, n_folds or 5, threshold, group_pattern, name)]


def _check_path(path: Path, n_folds: int, threshold: int | None, group_pattern: str | None, name: str,
                max_pixels: int | None = None, classes: list[str] | None = None,
                root: str | None = None) -> QualityReport:
    from medtune.data.loaders import list_folder, scan_manifest

    conflicts: list[str] = []
    with warnings.catch_warnings(record=True) as caught:  # the loaders' warnings go into the report
        warnings.simplefilter("always")
        if path.suffix.lower() == ".csv":
            scan = scan_manifest(path, classes, root)
            paths, labels, class_names, groups = scan.paths, scan.labels, scan.class_names, scan.groups
            notes = [scan.repeat_message()] if scan.repeats else []
            conflicts = [f"manifest {path}: {c}" for c in scan.conflicts]
        else:
            paths, labels, class_names, groups = list_folder(path, group_pattern)
            notes = []
    report = check_files([str(p) for p in paths], list(labels), class_names, n_folds, threshold, groups, name,
                         max_pixels)
    report.warnings[:0] = [str(w.message) for w in caught] + notes
    report.manifest_conflicts = conflicts
    return report
