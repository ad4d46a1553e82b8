"""DICOM decoding: modality LUT, window / VOI LUT, MONOCHROME1, multi-frame, PatientID groups."""

import numpy as np
import pytest
import pydicom  # noqa: F401 - in the `dev` extra: a missing pydicom is a broken install, so these tests fail, not skip
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

from medtune.data.loaders import decode_image, load_dataset
from medtune.errors import DataError

# A 4x4 ramp of stored values 0..1500 (12 bits stored).
RAMP = (np.arange(16, dtype=np.uint16).reshape(4, 4) * 100)
# Data-set images need 8 pixels per side (`data.MIN_SIDE`): folders and manifests use the ramp at 8x8.
RAMP8 = np.kron(RAMP, np.ones((2, 2), np.uint16))


def write_dicom(path, pixels=RAMP, photometric="MONOCHROME2", patient="P1", window=None, voi_lut=None,
                slope=1.0, intercept=0.0, frames=1):
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    if patient is not None:
        ds.PatientID = patient
    ds.Modality = "OT"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.Rows, ds.Columns = pixels.shape[-2:]
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
    if frames > 1:
        ds.NumberOfFrames = frames
        pixels = np.stack([pixels + 0 * i for i in range(frames)])
        pixels[1] = pixels[1][::-1]  # frame 1 differs from frame 0
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = window
    if voi_lut is not None:
        item = Dataset()
        item.LUTDescriptor = [len(voi_lut), 0, 16]
        item.LUTData = np.asarray(voi_lut, dtype=np.uint16).tobytes()
        ds.VOILUTSequence = [item]
    ds.PixelData = np.ascontiguousarray(pixels.astype(np.uint16)).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def gray(path, **kw):
    """Channel 0 at the native 4x4 size (nearest resize keeps values when the size is unchanged)."""
    return decode_image(path, 4, **kw)[0].astype(int)


def test_monochrome2_min_max_and_monochrome1_inverted(tmp_path):
    m2 = gray(write_dicom(tmp_path / "a.dcm"))
    assert m2[0, 0] == 0 and m2[-1, -1] == 255
    assert np.all(np.diff(m2.reshape(-1)) >= 0)  # the ramp stays a ramp
    m1 = gray(write_dicom(tmp_path / "b.dcm", photometric="MONOCHROME1"))
    np.testing.assert_array_equal(m1, 255 - m2)


def test_window_centre_width_clips_to_the_window(tmp_path):
    # Rescale to 0..3000 "HU", then window 1000 +- 500: stored 0..250 -> black, 750+ -> white.
    img = gray(write_dicom(tmp_path / "w.dcm", slope=2.0, window=(1000, 1000)))
    values = (RAMP * 2.0).reshape(-1)
    flat = img.reshape(-1)
    assert np.all(flat[values <= 500] == 0)
    assert np.all(flat[values >= 1500] == 255)
    mid = flat[(values > 500) & (values < 1500)]
    assert len(mid) and np.all((mid > 0) & (mid < 255))
    # Without the window the same file is a plain min-max ramp, so windowing did change the pixels.
    assert not np.array_equal(img, gray(write_dicom(tmp_path / "nw.dcm", slope=2.0)))


def test_voi_lut_is_applied(tmp_path):
    # A LUT that maps every stored value to 255 - value//8 (an inverse ramp); its output range
    # 0..255 is stretched to 8 bits as is.
    lut = [255 - min(v // 8, 255) for v in range(2048)]
    img = gray(write_dicom(tmp_path / "l.dcm", voi_lut=lut))
    expected = np.array([lut[v] for v in RAMP.reshape(-1)]).reshape(4, 4)
    np.testing.assert_allclose(img, expected, atol=1)


def test_multi_frame_refused_unless_frame_chosen(tmp_path):
    path = write_dicom(tmp_path / "mf.dcm", frames=2)
    with pytest.raises(DataError, match="multi-frame.*frame"):
        decode_image(path, 4)
    f0, f1 = gray(path, frame=0), gray(path, frame=1)
    np.testing.assert_array_equal(f1, f0[::-1])
    with pytest.raises(DataError, match="frame 5 requested"):
        decode_image(path, 4, frame=5)


def make_folder(root):
    for cls, base in (("benign", 0), ("malignant", 1)):
        (root / cls).mkdir(parents=True)
        for i in range(3):
            pix = RAMP8 + 50 * (3 * base + i)
            write_dicom(root / cls / f"img{i}.dcm", pixels=pix, patient=f"P{i % 2}{cls[0]}")
    return root


def test_folder_of_dicoms_groups_by_patient_id(tmp_path):
    root = make_folder(tmp_path / "data")
    table = load_dataset(root, source="auto", image_size=16)
    assert table.class_names == ["benign", "malignant"]
    assert table.images.shape == (6, 3, 16, 16)
    assert list(table.groups) == ["P0b", "P1b", "P0b", "P0m", "P1m", "P0m"]
    # `source: dicom` is the same loader, explicitly.
    same = load_dataset(root, source="dicom", image_size=16)
    assert same.fingerprint() == table.fingerprint()


def test_manifest_patient_id_column_wins_over_header(tmp_path):
    root = make_folder(tmp_path / "data")
    rows = ["path,label"] + [f"{c}/img{i}.dcm,{c}" for c in ("benign", "malignant") for i in range(3)]
    (root / "m.csv").write_text("\n".join(rows) + "\n")
    from_header = load_dataset(root / "m.csv", image_size=8)
    assert list(from_header.groups) == ["P0b", "P1b", "P0b", "P0m", "P1m", "P0m"]
    rows = ["path,label,patient_id"] + [f"{c}/img{i}.dcm,{c},X{i}" for c in ("benign", "malignant") for i in range(3)]
    (root / "m2.csv").write_text("\n".join(rows) + "\n")
    assert list(load_dataset(root / "m2.csv", image_size=8).groups) == ["X0", "X1", "X2"] * 2


def test_missing_patient_id_gets_own_group_with_warning(tmp_path):
    root = make_folder(tmp_path / "data")
    write_dicom(root / "benign" / "anon.dcm", pixels=RAMP8, patient=None)
    with pytest.warns(UserWarning, match="no PatientID"):
        table = load_dataset(root, image_size=8)
    anon = table.paths.index(str(root / "benign" / "anon.dcm"))
    assert table.groups[anon].startswith("file:") and list(table.groups).count(table.groups[anon]) == 1


def test_corrupt_dicom_named_in_error(tmp_path):
    root = make_folder(tmp_path / "data")
    (root / "benign" / "bad.dcm").write_bytes(b"\0" * 128 + b"DICM" + b"garbage")
    with pytest.raises(DataError, match="bad.dcm"):
        load_dataset(root, image_size=8)
