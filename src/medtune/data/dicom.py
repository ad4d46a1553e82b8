"""DICOM files as display-ready 8-bit images, the way a radiologist's viewer shows them.

Stored values are not what a reader sees: the modality LUT (rescale slope/intercept) turns them
into physical units, the VOI LUT or window centre/width chosen by the modality selects the
displayed range, and MONOCHROME1 means "bright is low". Training on raw stored values would
give the network a different contrast per scanner, so every step is applied here, by pydicom's
own functions. pydicom is an optional dependency (`pip install medtune[dicom]`).
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from medtune.errors import DataError, DataWarning

DICOM_SUFFIXES = {".dcm", ".dicom"}


def is_dicom(path: str | Path, head: bytes | None = None) -> bool:
    """By suffix, or by the `DICM` magic at byte 128 (DICOM files often have no suffix)."""
    if Path(path).suffix.lower() in DICOM_SUFFIXES:
        return True
    return head is not None and head[128:132] == b"DICM"


def _pydicom():
    try:
        import pydicom
    except ImportError as exc:
        raise DataError("reading DICOM files needs pydicom: `pip install 'medtune[dicom]'` "
                        "(or `pip install pydicom`).") from exc
    return pydicom


def _read(path: Path, data: bytes | None = None, pixels: bool = True):
    pydicom = _pydicom()
    try:
        return pydicom.dcmread(io.BytesIO(data) if data is not None else str(path), force=True,
                               stop_before_pixels=not pixels)
    except Exception as exc:  # noqa: BLE001 - every parser failure means the same to the user
        raise DataError(f"{path}: not a readable DICOM file ({type(exc).__name__}: {exc}). "
                        "Re-export or remove it.") from exc


def dicom_to_uint8(ds, path: str | Path, frame: int | None = None) -> np.ndarray:
    """(H, W) or (H, W, 3) uint8 after modality LUT, VOI LUT / window and MONOCHROME1 inversion."""
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    if "PixelData" not in ds:
        raise DataError(f"{path}: DICOM file has no pixel data (a report or structured document?). Remove it.")
    try:
        arr = ds.pixel_array
    except Exception as exc:  # noqa: BLE001 - missing codec, truncated pixel data, ...
        raise DataError(f"{path}: DICOM pixel data cannot be decoded ({exc}). Compressed transfer syntaxes need "
                        "`pip install pylibjpeg pylibjpeg-libjpeg pylibjpeg-openjpeg`.") from exc
    n_frames = int(ds.get("NumberOfFrames", 1) or 1)
    if n_frames > 1:
        if frame is None:
            raise DataError(f"{path}: multi-frame DICOM ({n_frames} frames); medtune needs one 2-D image per file. "
                            "Set `options: {frame: N}` on the data set to take frame N (0-based) of every "
                            "multi-frame file, or export single frames.")
        if not 0 <= frame < n_frames:
            raise DataError(f"{path}: frame {frame} requested but the file has {n_frames} frames (0-based).")
        arr = arr[frame]
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    if arr.ndim == 3:  # colour (pydicom already converted YBR to RGB): scale to 8 bits, no LUTs apply
        return _scale(arr.astype(np.float64), float(arr.min()), float(arr.max()))
    values = apply_modality_lut(arr, ds)
    if "VOILUTSequence" in ds:  # a LUT indexes by integer value; pydicom prefers it over a window
        values = np.rint(values).astype(np.int64)
        desc = ds.VOILUTSequence[0].LUTDescriptor
        entries = np.arange(int(desc[1]), int(desc[1]) + (int(desc[0]) or 65536))
        out_range = apply_voi_lut(entries, ds).astype(np.float64)
        values = apply_voi_lut(values, ds).astype(np.float64)
    elif "WindowCenter" in ds:
        values = apply_voi_lut(values.astype(np.float64), ds)
        out_range = apply_voi_lut(np.array([-1e12, 1e12]), ds).astype(np.float64)
    else:
        values = values.astype(np.float64)
        out_range = values
    # The VOI transform's own output range, not the image's: a window the image does not fill
    # must not be stretched to full contrast.
    lo, hi = float(out_range.min()), float(out_range.max())
    out = _scale(values, lo, hi)
    return 255 - out if photometric == "MONOCHROME1" else out


def _scale(values: np.ndarray, lo: float, hi: float) -> np.ndarray:
    if hi <= lo:
        return np.zeros(values.shape, dtype=np.uint8)
    return ((np.clip(values, lo, hi) - lo) / (hi - lo) * 255.0).round().astype(np.uint8)


def decode_dicom(path: str | Path, data: bytes | None = None, frame: int | None = None):
    """A PIL image of one DICOM file (mode L or RGB), ready for `data.decode_image` to resize."""
    from PIL import Image

    path = Path(path)
    arr = dicom_to_uint8(_read(path, data), path, frame)
    return Image.fromarray(arr, mode="RGB" if arr.ndim == 3 else "L")


def patient_ids(paths: list[str | Path]) -> np.ndarray | None:
    """PatientID of each file (header only), or None when no file has one.

    A file without an id gets its own group (its path) and a warning rather than an error:
    anonymisation often blanks a few headers, and the user can add ids through a manifest.
    """
    import warnings

    ids = [str(_read(Path(p), pixels=False).get("PatientID", "") or "").strip() for p in paths]
    if not any(ids):
        return None
    missing = [str(p) for p, i in zip(paths, ids) if not i]
    if missing:
        warnings.warn(f"{len(missing)} DICOM file(s) have no PatientID, e.g. {missing[0]}; each becomes its own "
                      "group. Add a patient_id column to a manifest if they belong to known patients.", DataWarning,
                      stacklevel=3)
    return np.asarray([i or f"file:{p}" for p, i in zip(paths, ids)], dtype=object)
