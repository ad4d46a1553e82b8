"""Data sets as one in-memory table: decode and resize once, slice batches from a uint8 tensor.

Every loader returns an `ImageTable`; training never touches files again. Each bad file is
collected and reported together with what to do, so a user fixes a folder in one pass instead of
one traceback at a time.
"""

from __future__ import annotations

import csv
import io
import os
import re
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from medtune.data.dicom import decode_dicom, is_dicom, patient_ids
from medtune.errors import ConfigError, DataError, DataWarning
from medtune.data.table import ImageTable, pixel_digest  # noqa: F401 - ImageTable is data's public type

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".gif", ".webp", ".pgm", ".ppm"}
# Files that commonly sit next to images and are not data; skipped with a warning.
SIDE_FILE_SUFFIXES = {".txt", ".md", ".csv", ".json", ".xml", ".yaml", ".yml", ".db", ".ini", ".pdf"}
DEFAULT_MAX_PIXELS = 64_000_000  # decompression-bomb guard: larger images are refused
# A data-set image with a side under this is a placeholder or a broken export, not a scan: upscaled
# to the backbone's size it becomes a flat patch that would be learnt as an example of its class.
MIN_SIDE = 8
MAX_LISTED = 10


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> 8-bit RGB. 16-bit and float images are min-max scaled, not clipped."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        finite = np.isfinite(arr)  # one NaN or inf pixel must not blank the whole image
        lo, hi = (float(arr[finite].min()), float(arr[finite].max())) if finite.any() else (0.0, 0.0)
        arr = np.where(finite, arr, lo)
        arr = (arr - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(arr)
        img = Image.fromarray(arr.round().astype(np.uint8), mode="L")
    if img.mode == "P":
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA"):
        background = Image.new("RGBA", img.size, (0, 0, 0, 255))
        img = Image.alpha_composite(background, img.convert("RGBA"))
    return img.convert("RGB")


def upright(img: Image.Image) -> Image.Image:
    """The image as viewers (and the labeller) show it: EXIF orientation applied; a malformed EXIF
    block leaves the pixels as stored rather than losing the image."""
    try:
        return ImageOps.exif_transpose(img)
    except Exception:  # noqa: BLE001 - EXIF parsing fails in many ways (struct, key, value errors)
        return img


def unusable(img: Image.Image) -> str | None:
    """Why a decodable image carries nothing to learn from (too small, fully transparent), or None.
    Checked for data-set images only: `predict` and the decoding tests take any size."""
    w, h = img.size
    if min(w, h) < MIN_SIDE:
        return (f"{w}x{h} pixels is too small to be a scan (a data-set image needs at least {MIN_SIDE} pixels per "
                "side); it is likely a placeholder or a broken export. Remove it or re-export the original image.")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img if img.mode in ("RGBA", "LA", "PA") else img.convert("RGBA")
        if rgba.getchannel("A").getextrema()[1] == 0:
            return ("every pixel is fully transparent (alpha 0), so the image is blank once composited. If its colour "
                    "channels hold the scan, re-save it as RGB without the alpha channel; otherwise remove it.")
    return None


def decode_image(path: str | Path, size: int, max_pixels: int = DEFAULT_MAX_PIXELS,
                 frame: int | None = None, strict: bool = False) -> np.ndarray:
    """Read one image file as uint8 (3, size, size). Raises DataError naming the file.
    DICOM files (by suffix or magic bytes) go through `medtune.data.dicom`; `frame` picks one frame
    of a multi-frame DICOM file. `strict` (data sets) also refuses images that decode but carry
    nothing (`unusable`)."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        if path.is_symlink() and not path.exists():
            raise DataError(f"{path}: a broken symbolic link (to {os.readlink(path)}); fix the link or remove "
                            "it.") from exc
        raise DataError(f"{path}: cannot be read ({exc.strerror or exc}).") from exc
    if not data:
        raise DataError(f"{path}: the file is empty (0 bytes). Remove it or replace it with the image.")
    if is_dicom(path, data[:132]):
        img = decode_dicom(path, data, frame)
        w, h = img.size
        if w * h > max_pixels:
            raise DataError(f"{path}: {w}x{h} pixels exceeds the limit of {max_pixels:,}; raise `max_pixels` if "
                            f"genuine.")
        if strict and (why := unusable(img)):
            raise DataError(f"{path}: {why}")
        img = to_rgb(img).resize((size, size), Image.BICUBIC)
        return np.asarray(img, dtype=np.uint8).transpose(2, 0, 1).copy()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            w, h = img.size
            if w * h > max_pixels:
                raise DataError(
                    f"{path}: {w}x{h} pixels exceeds the limit of {max_pixels:,} (decompression-bomb "
                    f"guard). Downscale the image, or raise `max_pixels` for this data set if it is genuine."
                )
            if getattr(img, "n_frames", 1) > 1 and img.format not in ("GIF",):
                raise DataError(f"{path}: has {img.n_frames} frames; medtune expects one 2-D image per file. Save "
                                "each frame you want (a slice, a still of a cine loop) as its own file.")
            img.load()
    except DataError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise DataError(f"{path}: refused as a possible decompression bomb ({exc}).") from exc
    except UnidentifiedImageError as exc:
        raise DataError(f"{path}: not an image file PIL can read. Remove it from the data folder.") from exc
    except (OSError, SyntaxError, ValueError) as exc:
        raise DataError(f"{path}: truncated or corrupt image ({exc}). Re-export or remove it.") from exc
    if strict and (why := unusable(img)):
        raise DataError(f"{path}: {why}")
    img = upright(img)
    img = to_rgb(img).resize((size, size), Image.BICUBIC)
    return np.asarray(img, dtype=np.uint8).transpose(2, 0, 1).copy()


def decode_many(paths: list[Path], size: int, max_pixels: int = DEFAULT_MAX_PIXELS,
                frame: int | None = None) -> torch.Tensor:
    """Decode in threads (PIL releases the GIL); every failure is collected into one error."""
    if not paths:
        raise DataError("no images to load.")
    out = np.empty((len(paths), 3, size, size), dtype=np.uint8)
    errors: list[str] = []

    def work(i: int) -> None:
        try:
            out[i] = decode_image(paths[i], size, max_pixels, frame, strict=True)
        except DataError as exc:
            errors.append(str(exc))

    with ThreadPoolExecutor(max_workers=4) as pool:
        list(pool.map(work, range(len(paths))))
    if errors:
        errors.sort()
        shown = "\n  ".join(errors[:MAX_LISTED])
        more = f"\n  ... and {len(errors) - MAX_LISTED} more" if len(errors) > MAX_LISTED else ""
        raise DataError(f"{len(errors)} of {len(paths)} image files cannot be used:\n  {shown}{more}")
    flat = out.reshape(len(out), -1)
    blank = np.flatnonzero(flat.min(axis=1) == flat.max(axis=1))
    if len(blank):
        warnings.warn(blank_warning([str(paths[i]) for i in blank]), DataWarning, stacklevel=3)
    return torch.from_numpy(out)


def blank_warning(paths: list[str]) -> str:
    """A constant image (an empty frame, a flat 16-bit export) still trains, as an uninformative example."""
    shown = ", ".join(paths[:3]) + (f" and {len(paths) - 3} more" if len(paths) > 3 else "")
    return (f"{len(paths)} image(s) are blank (every pixel the same value): {shown}. Check how they were exported; "
            "remove them if they hold no scan.")


# --------------------------------------------------------------------------- loaders
def _check_classes(class_names: list[str], labels: np.ndarray, where: str) -> None:
    counts = np.bincount(labels, minlength=len(class_names))
    empty = [c for c, k in zip(class_names, counts) if k == 0]
    if empty:
        raise DataError(f"{where}: class {', '.join(map(repr, empty))} has no images. Add images or remove the class.")
    if len(class_names) < 2:
        raise DataError(
            f"{where}: only one class ({class_names[0]!r}) was found; classification needs at least two. "
            "A folder data set needs one sub-folder per class."
        )


def load_folder(root: str | Path, size: int, group_pattern: str | None = None,
                max_pixels: int = DEFAULT_MAX_PIXELS, frame: int | None = None) -> ImageTable:
    """One sub-folder per class. `group_pattern` (a regex with one group) reads a patient id
    from each file name, e.g. `^(P\\d+)_` for `P012_left.png`; without it, DICOM files are
    grouped by the PatientID in their headers."""
    paths, labels_arr, class_names, groups = list_folder(root, group_pattern)
    images = decode_many(paths, size, max_pixels, frame)
    if groups is None:
        groups = _dicom_groups(paths)
    return ImageTable(images, labels_arr, class_names, [str(p) for p in paths], groups, name=Path(root).name)


def list_folder(root: str | Path, group_pattern: str | None = None
                ) -> tuple[list[Path], np.ndarray, list[str], np.ndarray | None]:
    """The files of a folder data set without decoding them: (paths, labels, class names, groups).
    Shared by `load_folder` and `medtune data check`, which must list files it cannot decode."""
    root = Path(root)
    if not root.exists():
        raise DataError(f"data folder {root} does not exist. Check `path` in the config (relative paths are "
                        "relative to the directory you run medtune from).")
    if not root.is_dir():
        raise DataError(f"{root} is not a folder. A folder data set needs one sub-folder per class.")
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not class_dirs:
        raise DataError(f"{root} has no class sub-folders. Put the images of each class in their own sub-folder "
                        f"(e.g. {root}/benign/*.png, {root}/malignant/*.png).")
    paths: list[Path] = []
    labels: list[int] = []
    skipped: list[str] = []
    for label, d in enumerate(class_dirs):
        for f in _walk_files(d):
            if f.name.startswith(".") or f.name == "Thumbs.db":
                continue
            if f.suffix.lower() in SIDE_FILE_SUFFIXES:
                skipped.append(str(f))
                continue
            paths.append(f)
            labels.append(label)
    if skipped:
        warnings.warn(f"skipped {len(skipped)} non-image side files, e.g. {skipped[0]}", DataWarning, stacklevel=2)
    stray = sorted(f.name for f in root.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES | {".dcm"})
    if stray:
        warnings.warn(f"{len(stray)} image file(s) sit directly in {root}, outside the class sub-folders, e.g. "
                      f"{stray[0]}; they are not used. Move each into its class's sub-folder.", DataWarning,
                      stacklevel=2)
    class_names = [d.name for d in class_dirs]
    labels_arr = np.asarray(labels, dtype=np.int64)
    _check_classes(class_names, labels_arr, str(root))
    groups = None
    if group_pattern:
        rx = compile_group_pattern(group_pattern)
        ids = []
        for f in paths:
            m = rx.search(f.name)
            if not m:
                raise DataError(f"{f}: file name does not match group_pattern {group_pattern!r}; every file needs "
                                "a patient id, or drop group_pattern.")
            pid = m.group(1) if m.groups() else m.group(0)
            if not pid:  # e.g. `(\d*)` on a name without digits: every such file would be one "patient"
                raise DataError(f"{f}: group_pattern {group_pattern!r} reads an empty patient id from this file name; "
                                "make the group match at least one character (`+`, not `*`).")
            ids.append(pid)
        groups = np.asarray(ids, dtype=object)
    return paths, labels_arr, class_names, groups


def _walk_files(folder: Path) -> list[Path]:
    """Every file under `folder`, sorted: symlinked folders followed (data is often linked in),
    each real folder once (a link loop is skipped with a warning), hidden folders
    (.ipynb_checkpoints, .git) left out, broken links kept so decoding names them."""
    files: list[Path] = []
    seen: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:
            dirnames[:] = []
            warnings.warn(f"{dirpath}: a symbolic link back to {real}, already read; skipped (remove the link if "
                          "it is a loop).", DataWarning, stacklevel=4)
            continue
        seen.add(real)
        dirnames[:] = [n for n in dirnames if not n.startswith(".")]
        files += [Path(dirpath) / n for n in filenames]
    return sorted(files)


def compile_group_pattern(pattern: str) -> re.Pattern:
    """The regex, or a ConfigError naming it: a typo in a YAML regex is the user's, not a traceback."""
    try:
        return re.compile(pattern)
    except re.error as exc:
        raise ConfigError(f"group_pattern {pattern!r} is not a valid regular expression ({exc}). Fix it in the "
                          r"config (or --group-pattern); e.g. `^(P\d+)_` reads `P012` from `P012_left.png`.") from exc


def load_manifest(csv_path: str | Path, size: int, max_pixels: int = DEFAULT_MAX_PIXELS,
                  classes: list[str] | None = None, frame: int | None = None,
                  root: str | Path | None = None) -> ImageTable:
    """CSV with columns path,label[,patient_id]; paths relative to `root` (default: the CSV's
    folder) and never outside it (a manifest must not reach into the rest of the file system;
    `root` names the one folder it may read, for a manifest kept apart from its images). Without
    a patient_id column, DICOM files are grouped by the PatientID in their headers."""
    paths, labels, class_names, groups = read_manifest(csv_path, classes, root)
    images = decode_many(paths, size, max_pixels, frame)
    if groups is None:
        groups = _dicom_groups(paths)
    return ImageTable(images, labels, class_names, [str(p) for p in paths], groups, name=Path(csv_path).stem)


def manifest_root(csv_path: str | Path, root: str | Path | None = None) -> Path:
    """The folder a manifest's paths are relative to and confined to: `root` when given (relative
    to the working directory, like the manifest's own path), else the manifest's folder."""
    base = Path(root) if root is not None else Path(csv_path).parent
    if root is not None and not base.is_dir():
        raise DataError(f"manifest {csv_path}: options.root {str(root)!r} is not a folder; give the folder the "
                        "manifest's image paths are relative to.")
    return base.resolve()


def read_manifest(csv_path: str | Path, classes: list[str] | None = None, root: str | Path | None = None
                  ) -> tuple[list[Path], np.ndarray, list[str], np.ndarray | None]:
    """The rows of a manifest, validated, without decoding: (paths, labels, class names, groups).
    A row repeated word for word is kept once, with a warning; one file given two labels (or two
    patient ids) is an error, since no one can say which row is right."""
    scan = scan_manifest(csv_path, classes, root)
    if scan.repeats:
        warnings.warn(scan.repeat_message(), DataWarning, stacklevel=2)
    if scan.conflicts:
        raise DataError(scan.conflict_message())
    return scan.paths, scan.labels, scan.class_names, scan.groups


@dataclass
class ManifestScan:
    """A manifest read leniently, for `data check` to report everything at once: repeated rows
    (dropped, each a warning) and contradictory rows (kept, each an error for `read_manifest`)."""
    csv_path: Path
    paths: list[Path]
    labels: np.ndarray
    class_names: list[str]
    groups: np.ndarray | None
    repeats: list[str]  # "line 6 repeats line 2 ('a.png', 'benign')"
    conflicts: list[str]

    def repeat_message(self) -> str:
        """One warning for all repeated rows (a manifest pasted in twice repeats every row)."""
        n = len(self.repeats)
        shown = "; ".join(self.repeats[:3]) + (f"; and {n - 3} more" if n > 3 else "")
        what = "row repeats an earlier row" if n == 1 else "rows repeat earlier rows"
        return (f"manifest {self.csv_path}: {n} {what} word for word ({shown}); each file is kept once. Delete the "
                "repeated rows.")

    def conflict_message(self) -> str:
        shown = "; ".join(self.conflicts[:MAX_LISTED])
        more = f"; ... and {len(self.conflicts) - MAX_LISTED} more" if len(self.conflicts) > MAX_LISTED else ""
        return (f"manifest {self.csv_path}: {shown}{more}. A file has one label and one patient: keep one row per "
                "file, with the right values.")


def _manifest_rows(csv_path: Path) -> tuple[list[str], list[tuple[int, dict[str, str]]]]:
    """(columns, [(line number, row)]): line numbers as a text editor shows them (blank lines and
    quoted line breaks counted), and rows with too many or too few fields reported by line."""
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as fh:
            reader = csv.reader(fh)
            header = next(reader, [])
            columns = [c.strip() for c in header]
            rows, problems = [], []
            start = reader.line_num + 1
            for fields in reader:
                line, start = start, reader.line_num + 1
                if not any(f.strip() for f in fields):
                    continue
                if any("\n" in f for f in fields):
                    problems.append(f"line {line}: a field opens a quote (\") that does not close before line "
                                    f"{reader.line_num}; quote whole fields only (\"a,b.png\")")
                elif len(fields) != len(columns):
                    problems.append(f"line {line}: {len(fields)} field(s) where the header has {len(columns)}; quote "
                                    "values that contain commas")
                else:
                    rows.append((line, {c: f.strip() for c, f in zip(columns, fields)}))
    except (UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"manifest {csv_path} is not a readable UTF-8 CSV file ({exc}). Save it as UTF-8 CSV "
                        "(comma-separated).") from exc
    repeated = sorted({c for c in columns if columns.count(c) > 1})
    if repeated:
        raise DataError(f"manifest {csv_path}: column(s) {', '.join(repeated)} appear more than once in the header "
                        f"{columns}; keep one of each.")
    missing = [c for c in ("path", "label") if c not in columns]
    if missing:
        hint = ""
        if len(columns) == 1 and any(sep in columns[0] for sep in ";\t|"):
            hint = " The file seems to use another separator than commas; save it as comma-separated values."
        elif any(c.lower() in ("path", "label") for c in columns):
            hint = " Column names are lower case (`path`, `label`)."
        raise DataError(f"manifest {csv_path} lacks column(s) {', '.join(missing)}; found {columns or 'none'}. "
                        f"Expected a header line `path,label[,patient_id]`.{hint}")
    if problems:
        raise DataError(_rows_message(csv_path, problems))
    return columns, rows


def _rows_message(csv_path: Path, problems: list[str]) -> str:
    shown = "\n  ".join(problems[:MAX_LISTED])
    more = f"\n  ... and {len(problems) - MAX_LISTED} more" if len(problems) > MAX_LISTED else ""
    return f"manifest {csv_path}: {len(problems)} bad row(s):\n  {shown}{more}"


def scan_manifest(csv_path: str | Path, classes: list[str] | None = None, root: str | Path | None = None
                  ) -> ManifestScan:
    """Read and validate a manifest's rows, collecting repeated and contradictory rows (see
    `ManifestScan`); missing files, empty cells and paths outside the root still raise."""
    csv_path = Path(csv_path)
    if csv_path.is_dir():
        raise DataError(f"manifest {csv_path} is a folder; a manifest is a .csv file. For a folder with one sub-folder "
                        "per class use `source: folder`.")
    if not csv_path.is_file():
        raise DataError(f"manifest {csv_path} does not exist.")
    base = manifest_root(csv_path, root)
    where = "options.root" if root is not None else "the manifest's folder"
    columns, numbered = _manifest_rows(csv_path)
    if not numbered:
        raise DataError(f"manifest {csv_path} has a header but no rows.")
    has_pid = "patient_id" in columns
    problems: list[str] = []
    repeats: list[str] = []
    conflicts: list[str] = []
    seen: dict[Path, tuple[int, dict[str, str]]] = {}
    rows: list[dict[str, str]] = []
    paths: list[Path] = []
    for line, row in numbered:
        if not row["path"] or not row["label"]:
            problems.append(f"line {line}: empty {'path' if not row['path'] else 'label'}")
            continue
        p = (base / row["path"]).resolve()
        if not p.is_relative_to(base):
            problems.append(f"line {line}: path {row['path']!r} points outside {where} {base} (refused)")
            continue
        if p.is_dir():
            problems.append(f"line {line}: {row['path']!r} is a folder, not an image file")
            continue
        if not p.is_file():
            problems.append(f"line {line}: file {row['path']!r} does not exist")
            continue
        if p in seen:
            first, earlier = seen[p]
            if earlier["label"] != row["label"]:
                conflicts.append(f"{earlier['path']!r} is labelled {earlier['label']!r} on line {first} and "
                                 f"{row['label']!r} on line {line}")
            elif has_pid and earlier["patient_id"] != row["patient_id"]:
                conflicts.append(f"{earlier['path']!r} has patient_id {earlier['patient_id']!r} on line {first} and "
                                 f"{row['patient_id']!r} on line {line}")
            else:
                repeats.append(f"line {line} repeats line {first} ({earlier['path']!r}, {row['label']!r})")
                continue
        else:
            seen[p] = (line, row)
        rows.append(row)
        paths.append(p)
    if problems:
        raise DataError(_rows_message(csv_path, problems))
    found = sorted({r["label"] for r in rows})
    if classes is not None:
        unknown = sorted(set(found) - set(classes))
        if unknown:
            raise DataError(f"manifest {csv_path}: unknown label(s) {unknown}; the config's classes are {classes}.")
        class_names = list(classes)
    else:
        class_names = found
    index = {c: i for i, c in enumerate(class_names)}
    labels = np.asarray([index[r["label"]] for r in rows], dtype=np.int64)
    _check_classes(class_names, labels, str(csv_path))
    groups = None
    if has_pid:
        ids = [r["patient_id"] for r in rows]
        if any(not i for i in ids):
            raise DataError(f"manifest {csv_path}: some rows have an empty patient_id; fill them or drop the column.")
        groups = np.asarray(ids, dtype=object)
    return ManifestScan(csv_path, paths, labels, class_names, groups, repeats, conflicts)


def manifest_columns(csv_path: str | Path, names: list[str], root: str | Path | None = None
                     ) -> dict[str, dict[str, str]]:
    """{column: {resolved image path: value}} for extra manifest columns (site, sex, age band...),
    read beside the images so subgroup reports and `cv: by_site` can look them up per image."""
    csv_path = Path(csv_path)
    if csv_path.suffix.lower() != ".csv" or not csv_path.is_file():
        raise DataError(f"{csv_path}: columns {names} (subgroups / cv: by_site) come from a .csv manifest; this data "
                        "set is not one. Write a manifest with those columns (docs/data.md).")
    base = manifest_root(csv_path, root)
    columns, numbered = _manifest_rows(csv_path)
    rows = [r for _, r in numbered]
    missing = [n for n in names if n not in columns]
    if missing:
        raise DataError(f"manifest {csv_path} lacks column(s) {missing} named in the config (subgroups / cv: by_site); "
                        f"it has {columns}.")
    return {n: {str((base / r["path"]).resolve()): r[n] for r in rows} for n in names}


def _dicom_groups(paths: list[Path]) -> np.ndarray | None:
    """Patient ids from DICOM headers when every file is DICOM (the images decoded already, so
    the headers are readable); None for other data."""
    if not all(is_dicom(p) or _has_dicom_magic(p) for p in paths):
        return None
    return patient_ids(paths)


def _has_dicom_magic(path: Path) -> bool:
    with open(path, "rb") as fh:
        return is_dicom(path, fh.read(132))


def load_dicom(path: str | Path, size: int, **options) -> ImageTable:
    """`source: dicom`: a folder per class or a .csv manifest of DICOM files (options: frame)."""
    return (load_manifest if Path(path).suffix.lower() == ".csv" else load_folder)(path, size, **options)


def load_npz(npz_path: str | Path, size: int | None, class_names: list[str] | None = None) -> ImageTable:
    """MedMNIST-style `.npz`: `{train,val,test}_images` and `_labels`, merged, the official split
    kept in `split`. `size` None keeps the stored size (`data check` reports it as stored)."""
    npz_path = Path(npz_path)
    try:
        npz = np.load(npz_path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise DataError(f"{npz_path}: not a .npz file (a zip of NumPy arrays) that NumPy can read. Give the MedMNIST "
                        ".npz as downloaded, or a file written with numpy.savez.") from exc
    if not hasattr(npz, "files"):  # a single-array .npy saved under a .npz name
        raise DataError(f"{npz_path}: holds one array, not the named arrays of a .npz (train_images, "
                        "train_labels, ...).")
    parts = [s for s in ("train", "val", "test") if f"{s}_images" in npz.files]
    if not parts:
        raise DataError(f"{npz_path}: no `train_images`/`val_images`/`test_images` arrays; found {npz.files}.")
    images, labels, split = [], [], []
    for s in parts:
        if f"{s}_labels" not in npz.files:
            raise DataError(f"{npz_path}: has `{s}_images` but no `{s}_labels`.")
        x, y = _npz_array(npz, npz_path, f"{s}_images"), _npz_array(npz, npz_path, f"{s}_labels")
        if y.ndim == 2 and y.shape[1] > 1:
            raise DataError(f"{npz_path}: `{s}_labels` is multi-label {y.shape}; medtune handles single-label tasks.")
        y = y.reshape(-1)
        if len(x) != len(y):
            raise DataError(f"{npz_path}: `{s}_images` has {len(x)} images but `{s}_labels` has {len(y)} labels; "
                            "each image needs one label.")
        if not np.issubdtype(y.dtype, np.number) or np.issubdtype(y.dtype, np.complexfloating):
            raise DataError(f"{npz_path}: `{s}_labels` are {y.dtype}; expected integer class indices.")
        if len(y) and (bad := y[y != np.round(y)]).size:
            raise DataError(f"{npz_path}: `{s}_labels` holds non-integer values ({bad[0]:g}); labels are class "
                            "indices 0, 1, ...")
        if len(y) and y.min() < 0:
            raise DataError(f"{npz_path}: `{s}_labels` holds negative values ({y.min():g}); labels are class "
                            "indices 0, 1, ...")
        if images and x.shape[1:3] != images[0].shape[1:3] and x.ndim >= 3 and images[0].ndim >= 3:
            raise DataError(f"{npz_path}: `{s}_images` are {x.shape[2]}x{x.shape[1]} but `{parts[0]}_images` are "
                            f"{images[0].shape[2]}x{images[0].shape[1]}; every split needs one image size.")
        images.append(x)
        labels.append(y.astype(np.int64))
        split += [s] * len(y)
    if not sum(len(y) for y in labels):
        raise DataError(f"{npz_path}: holds no images (every split is empty).")
    if len({x.ndim for x in images}) > 1 or len({x.shape[3:] for x in images}) > 1:
        raise DataError(f"{npz_path}: the splits' images have different shapes "
                        f"{[tuple(x.shape) for x in images]}; expected (N, H, W) or (N, H, W, 1|3) in every split.")
    x = np.concatenate(images)
    y = np.concatenate(labels)
    if x.ndim == 3:
        x = np.repeat(x[..., None], 3, axis=-1)
    if x.ndim != 4 or x.shape[-1] not in (1, 3):
        raise DataError(f"{npz_path}: images have shape {x.shape}; expected (N, H, W) or (N, H, W, 1|3).")
    if x.shape[-1] == 1:
        x = np.repeat(x, 3, axis=-1)
    if x.dtype != np.uint8:
        raise DataError(f"{npz_path}: images are {x.dtype}; expected uint8.")
    t = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
    if size is not None and (t.shape[-1] != size or t.shape[-2] != size):
        t = torch.nn.functional.interpolate(t.float(), size=(size, size), mode="bilinear", antialias=True,
                                            align_corners=False).round().clamp(0, 255).to(torch.uint8)
    n_classes = int(y.max()) + 1
    if class_names and n_classes > len(class_names):
        raise DataError(f"{npz_path}: labels go up to {n_classes - 1}, but the data set has {len(class_names)} "
                        f"classes ({', '.join(class_names)}); is the file from another MedMNIST flag?")
    names = class_names or [str(i) for i in range(n_classes)]
    _check_classes(names, y, str(npz_path))
    # Each image is named by its position within its own split, as MedMNIST numbers them (test/544).
    paths = [f"{npz_path}#{s}/{i}" for s, y_s in zip(parts, labels) for i in range(len(y_s))]
    return ImageTable(t, y, names, paths, split=np.asarray(split, dtype=object), name=npz_path.stem)


def _npz_array(npz, npz_path: Path, key: str) -> np.ndarray:
    """One array of the .npz; arrays of Python objects (pickles) are refused, never unpickled."""
    try:
        return np.asarray(npz[key])
    except ValueError as exc:
        raise DataError(f"{npz_path}: `{key}` is stored as Python objects (a pickle), which medtune does not load; "
                        "save it as a numeric array (uint8 images, integer labels).") from exc


MEDMNIST_SIZES = (28, 64, 128, 224)


def _medmnist_info(flag: str | None) -> dict | None:
    """The `medmnist` package's record of a data set (URLs, label names), or None when not installed."""
    if flag is None:
        return None
    try:
        from medmnist.info import INFO
    except ImportError:
        return None
    if flag not in INFO:
        flags = sorted(f for f in INFO if not f.endswith("3d"))
        raise DataError(f"MedMNIST flag {flag!r} is unknown; 2-D flags are {', '.join(flags)}.")
    return INFO[flag]


def load_medmnist(path: str | Path | None, image_size: int, flag: str | None = None, size: int | None = None,
                  root: str | None = None) -> ImageTable:
    """`source: medmnist`: a MedMNIST `.npz` given by `path`, found in a folder, or downloaded.

    `size` is the MedMNIST resolution to read (28, 64, 128 or 224; default: the smallest one at
    least `image_size`, so no detail is invented by upsampling). Without a `.npz` path the file
    `{flag}_{size}.npz` is looked for in `path` (a folder) or `root` (default ~/.medmnist), and
    fetched with the `medmnist` package's own download when it is missing.
    """
    size = size or next((s for s in MEDMNIST_SIZES if s >= image_size), 224)
    if size not in MEDMNIST_SIZES:
        raise DataError(f"MedMNIST option size: {size} is not one of {MEDMNIST_SIZES}.")
    p = Path(path).expanduser() if path else None
    if p is not None and p.suffix.lower() == ".npz":
        if not p.is_file():
            raise DataError(f"MedMNIST file {p} does not exist. Check `path` in the config.")
        flag = flag or re.sub(r"_\d+$", "", p.stem)
    else:
        if not flag:
            raise DataError("MedMNIST needs `options: {flag: NAME}` (e.g. breastmnist) or `path` to a .npz file.")
        folder = p or Path(root or "~/.medmnist").expanduser()
        p = folder / f"{flag}{'' if size == 28 else f'_{size}'}.npz"
        if not p.is_file():
            _download_medmnist(flag, size, folder, p)
    info = _medmnist_info(flag) if flag else None
    names = [info["label"][k] for k in sorted(info["label"], key=int)] if info else None
    return load_npz(p, image_size, class_names=names)


def _download_medmnist(flag: str, size: int, folder: Path, target: Path) -> None:
    """The medmnist package's own download; any failure becomes one message saying where the file goes."""
    info = _medmnist_info(flag)
    url = info[f"url{'' if size == 28 else f'_{size}'}"] if info else "https://zenodo.org/records/10519652"
    how = (f"Download {target.name} from {url} and put it at {target}, or set the data set's `path` to the .npz "
           f"file (e.g. --set datasets.0.path=/data/{target.name}).")
    if info is None:
        raise DataError(f"MedMNIST {flag!r} is not at {target} and cannot be downloaded without the medmnist "
                        f"package (`pip install 'medtune[medmnist]'`). {how}")
    try:
        import medmnist.dataset

        folder.mkdir(parents=True, exist_ok=True)
        getattr(medmnist.dataset, info["python_class"])(split="test", download=True, size=size, root=str(folder))
    except Exception as exc:  # noqa: BLE001 - offline, proxy, checksum: the remedy is the same
        detail = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else "no detail"
        raise DataError(f"MedMNIST {flag!r} ({size} px) could not be downloaded ({type(exc).__name__}: "
                        f"{detail}). {how}") from exc
    if not target.is_file():
        raise DataError(f"MedMNIST download finished but {target} is missing. {how}")


def load_dataset(path: str | Path | None = None, *, source: str = "auto", image_size: int = 224,
                 name: str | None = None, **options) -> ImageTable:
    """One way in: `source` is folder | manifest | npz | dicom | medmnist | synthetic | auto (from the path)."""
    try:
        table = _load(path, source, image_size, name, options)
    except TypeError as exc:  # an option the loader does not take: a typo in the YAML's `options`, or one
        # that only another source takes and that collides with this loader's own argument (a folder's `root`)
        if "unexpected keyword argument" not in str(exc) and "got multiple values for argument" not in str(exc):
            raise
        if "'group_pattern'" in str(exc):  # set beside `path`, not in `options`: say where ids come from instead
            raise DataError(f"data set {name or path!r}: group_pattern reads patient ids from the file names of a "
                            "folder data set; a manifest gives them in a `patient_id` column, and MedMNIST and "
                            "synthetic data have none to read. Remove group_pattern.") from exc
        clash = re.search(r"multiple values for argument '(\w+)'", str(exc))
        what = (f"option {clash.group(1)!r} is not one this source takes" if clash
                else str(exc).split('() ', 1)[-1])
        raise DataError(f"data set {name or path!r}: {what}; check its `options` for source {source!r} "
                        "(docs/data.md lists each source's options).") from exc
    if name:
        table.name = name
    return table


def _load(path, source: str, image_size: int, name: str | None, options: dict) -> ImageTable:
    if source == "synthetic":
        from medtune.data.synthetic import make_ultrasound

        if "size" in options:
            raise DataError(f"data set {name or 'synthetic'!r}: `options: size` is not a synthetic option; the "
                            "image size is the backbone's `image_size`.")
        try:
            table = make_ultrasound(size=image_size, **options)
        except ValueError as exc:
            raise DataError(f"data set {name or 'synthetic'!r}: {exc}.") from exc
        except TypeError as exc:
            if "unexpected keyword argument" in str(exc):
                raise
            raise DataError(f"data set {name or 'synthetic'!r}: an option has the wrong type ({exc}); options "
                            f"{options} should be numbers (docs/config.md lists them).") from exc
    elif source == "medmnist":
        table = load_medmnist(path, image_size, **options)
    else:
        if path is None:
            raise DataError(f"data set {name or ''!r}: `path` is required for source {source!r}.")
        p = Path(path)
        if source == "auto":
            source = "manifest" if p.suffix.lower() == ".csv" else "npz" if p.suffix.lower() == ".npz" else "folder"
        loaders = {"folder": load_folder, "manifest": load_manifest, "npz": load_npz, "dicom": load_dicom}
        if source not in loaders:
            raise DataError(f"unknown data source {source!r}; use one of "
                            f"{sorted([*loaders, 'medmnist', 'synthetic', 'auto'])}.")
        table = loaders[source](p, image_size, **options)
    return table
