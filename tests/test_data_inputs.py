"""Bad data inputs a user hands medtune, as issues 37 and 38 found them: each must end in a clear
message naming the file, line or value (an error, or a warning where the data stays usable), seen
alike by `medtune run` (data/loaders.py) and `medtune data check` (data/quality.py)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from conftest import tiny_config, write_png
from medtune.cli import app
from medtune.data.loaders import load_folder, load_manifest, load_npz
from medtune.errors import ConfigError, DataError
from medtune.data.splits import check_foldable


def folder(root: Path, n: int = 3) -> Path:
    """Two classes x n distinct random PNGs (24x24)."""
    for c, cls in enumerate(("benign", "malignant")):
        for i in range(n):
            write_png(root / cls / f"{cls}_{i}.png", seed=100 * c + i)
    return root


def check_cli(*args: str):
    result = CliRunner().invoke(app, ["data", "check", *map(str, args)])
    return result, " ".join(result.output.split())


# --------------------------------------------------------------------------- group_pattern (issue 38)
def test_invalid_group_pattern_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match=r"group_pattern '\(\[' is not a valid regular expression \(unterminated "
                                        r"character set at position 1\)"):
        load_folder(folder(tmp_path / "d"), 16, group_pattern="([")


def test_invalid_group_pattern_through_cli_run_is_one_paragraph(tmp_path):
    data = folder(tmp_path / "d")
    cfg = tiny_config(tmp_path, datasets=[{"name": "d", "path": str(data), "group_pattern": "(["}])
    result = CliRunner().invoke(app, ["run", str(cfg), "--quiet"])
    text = result.output.strip()
    assert result.exit_code == 2, text
    assert "Traceback" not in text and text.startswith("error:") and "\n\n" not in text
    flat = " ".join(text.split())
    assert "group_pattern '([' is not a valid regular expression" in flat and "unterminated character set" in flat


def test_invalid_group_pattern_through_data_check(tmp_path):
    result, out = check_cli(folder(tmp_path / "d"), "--group-pattern", "(?P<x")
    assert result.exit_code == 2 and "group_pattern '(?P<x' is not a valid regular expression" in out


def test_group_pattern_matching_an_empty_id_is_refused(tmp_path):
    with pytest.raises(DataError, match=r"benign_0\.png: group_pattern '\(z\*\)' reads an empty patient id"):
        load_folder(folder(tmp_path / "d"), 16, group_pattern="(z*)")


# ---------------------------------------------------------------------- images that decode but carry nothing (issue 37)
@pytest.mark.parametrize("size", [(1, 1), (300, 2)])
def test_tiny_image_refused_by_run_and_listed_by_data_check(tmp_path, size):
    data = folder(tmp_path / "d")
    Image.new("RGB", size, (90, 90, 90)).save(data / "benign" / "dot.png")
    w, h = size
    with pytest.raises(DataError, match=rf"dot\.png: {w}x{h} pixels is too small to be a scan .*at least 8 pixels"):
        load_folder(data, 16)
    result, out = check_cli(data, "--folds", "2")
    assert result.exit_code == 1, out
    assert f"dot.png: {w}x{h} pixels is too small" in out


def test_fully_transparent_image_refused(tmp_path):
    data = folder(tmp_path / "d")
    Image.new("RGBA", (24, 24), (200, 10, 10, 0)).save(data / "malignant" / "clear.png")
    with pytest.raises(DataError, match=r"clear\.png: every pixel is fully transparent \(alpha 0\).*RGB"):
        load_folder(data, 16)
    result, out = check_cli(data, "--folds", "2")
    assert result.exit_code == 1 and "clear.png: every pixel is fully transparent" in out


def test_fully_transparent_palette_and_la_images_refused(tmp_path):
    data = folder(tmp_path / "d")
    pal = Image.new("P", (24, 24), 3)
    pal.putpalette([10, 20, 30] * 4)
    pal.save(data / "benign" / "pal.png", transparency=3)
    Image.new("LA", (24, 24), (120, 0)).save(data / "malignant" / "la.png")
    with pytest.raises(DataError) as err:
        load_folder(data, 16)
    assert "pal.png: every pixel is fully transparent" in str(err.value)
    assert "la.png: every pixel is fully transparent" in str(err.value)


def test_partly_transparent_image_still_accepted(tmp_path):
    data = folder(tmp_path / "d")
    arr = np.zeros((24, 24, 4), np.uint8)
    arr[..., :3] = 150
    arr[:12, :, 3] = 255
    Image.fromarray(arr, mode="RGBA").save(data / "benign" / "half.png")
    assert len(load_folder(data, 16)) == 7


def test_blank_image_is_a_warning_naming_it(tmp_path):
    data = folder(tmp_path / "d")
    Image.fromarray(np.full((24, 24), 700, np.uint16)).save(data / "benign" / "flat16.png")
    with pytest.warns(UserWarning, match=r"1 image\(s\) are blank \(every pixel the same value\).*flat16\.png"):
        table = load_folder(data, 16)
    assert len(table) == 7
    result, out = check_cli(data, "--folds", "2")
    assert result.exit_code == 0, out
    assert "warning:" in out and "flat16.png" in out and "blank" in out


# --------------------------------------------------------------------------- manifests: repeated rows (issue 37)
def manifest(root: Path, rows: list[str], header: str = "path,label") -> Path:
    folder(root)
    f = root / "m.csv"
    f.write_text("\n".join([header, *rows]) + "\n")
    return f


BASE_ROWS = ["benign/benign_1.png,benign", "malignant/malignant_0.png,malignant", "malignant/malignant_1.png,malignant"]


def test_identical_duplicate_row_warns_and_is_dropped(tmp_path):
    f = manifest(tmp_path / "d", ["benign/benign_0.png,benign", *BASE_ROWS, "./benign/benign_0.png,benign"])
    with pytest.warns(UserWarning, match=r"m\.csv: 1 row repeats an earlier row word for word \(line 6 repeats line 2 "
                                          r"\('benign/benign_0\.png', 'benign'\)\); each file is kept once"):
        table = load_manifest(f, 16)
    assert len(table) == 4 and sum(p.endswith("benign_0.png") for p in table.paths) == 1
    result, out = check_cli(f, "--folds", "2")
    assert result.exit_code == 0, out
    assert "warning:" in out and "line 6 repeats line 2" in out


def test_contradictory_rows_are_an_error_naming_lines_and_labels(tmp_path):
    f = manifest(tmp_path / "d", ["benign/benign_0.png,benign", *BASE_ROWS, "benign/benign_0.png,malignant"])
    with pytest.raises(DataError, match=r"m\.csv: 'benign/benign_0\.png' is labelled 'benign' on line 2 and "
                                        r"'malignant' on line 6.*one row per file"):
        load_manifest(f, 16)
    result, out = check_cli(f, "--folds", "2")
    assert result.exit_code == 1, out
    assert "'benign/benign_0.png' is labelled 'benign' on line 2 and 'malignant' on line 6" in out


def test_same_file_two_patient_ids_is_an_error(tmp_path):
    rows = ["benign/benign_0.png,benign,p1", "benign/benign_1.png,benign,p2", "malignant/malignant_0.png,malignant,p3",
            "benign/benign_0.png,benign,p9"]
    f = manifest(tmp_path / "d", rows, header="path,label,patient_id")
    with pytest.raises(DataError, match=r"'benign/benign_0\.png' has patient_id 'p1' on line 2 and 'p9' on line 5"):
        load_manifest(f, 16)


# --------------------------------------------------------------------------- data check exit status (issue 38)
def test_data_check_exit_status_is_documented():
    result = CliRunner().invoke(app, ["data", "check", "--help"])
    out = " ".join(result.output.split())
    assert result.exit_code == 0 and "Exit status: 0" in out and "1 when files cannot be used" in out


def test_data_check_exits_1_on_identical_images_with_different_labels(tmp_path):
    data = folder(tmp_path / "d")
    (data / "malignant" / "copy.png").write_bytes((data / "benign" / "benign_0.png").read_bytes())
    result, out = check_cli(data, "--folds", "2", "--exact-only", "--json")
    assert result.exit_code == 1
    (s,) = json.loads(result.stdout)
    assert s["exact_label_conflicts"] == 1 and s["failed"] is True


def test_data_check_exits_0_on_clean_data(tmp_path):
    result, out = check_cli(folder(tmp_path / "d"), "--folds", "2")
    assert result.exit_code == 0, out


# --------------------------------------------------------------------------- data check on MedMNIST (issue 38)
def write_npz(path: Path, n: dict[str, int], copy: tuple | None = None) -> Path:
    """A MedMNIST-layout .npz (uint8 (N, 28, 28) images, (N, 1) labels); `copy` = (split, i, split, j,
    label) puts image i of the first split at position j of the second, with that label."""
    rng = np.random.default_rng(0)
    arrays = {}
    for split, k in n.items():
        labels = np.arange(k) % 2
        arrays[f"{split}_images"] = rng.integers(0, 256, (k, 28, 28), dtype=np.uint8)
        arrays[f"{split}_labels"] = labels.reshape(-1, 1)
    if copy:
        a, i, b, j, label = copy
        arrays[f"{b}_images"][j] = arrays[f"{a}_images"][i]
        arrays[f"{b}_labels"][j] = label
    np.savez(path, **arrays)
    return path


def test_npz_paths_count_within_their_own_split(tmp_path):
    table = load_npz(write_npz(tmp_path / "b.npz", {"train": 6, "val": 2, "test": 4}), 28)
    assert table.paths[6:8] == [f"{tmp_path / 'b.npz'}#val/0", f"{tmp_path / 'b.npz'}#val/1"]
    assert table.paths[-1] == f"{tmp_path / 'b.npz'}#test/3"


def test_data_check_takes_an_npz(tmp_path):
    npz = write_npz(tmp_path / "breastmnist.npz", {"train": 6, "val": 2, "test": 4})
    result, out = check_cli(npz, "--folds", "2", "--json")
    assert result.exit_code == 0, out
    (s,) = json.loads(result.stdout)
    assert s["n_files"] == 12 and s["sizes"] == {"28x28": 12} and s["folds"] == 2


def test_data_check_takes_a_config_with_the_official_split(tmp_path):
    npz = write_npz(tmp_path / "breastmnist.npz", {"train": 6, "val": 2, "test": 4}, copy=("train", 0, "test", 2, 0))
    cfg = tiny_config(tmp_path, datasets=[{"name": "breast", "source": "medmnist", "path": str(npz),
                                           "options": {"split": "official"}}])
    result, out = check_cli(cfg, "--exact-only")
    assert result.exit_code == 0, out  # same label: a leak `run` refuses for the official split, not a conflict
    assert "official split" in out and "1 exact" in out
    assert "exact duplicates across splits:" in out and "#train/0" in out and "#test/2" in out


def test_duplicate_across_splits_says_the_labels_differ(tmp_path):
    npz = write_npz(tmp_path / "breastmnist.npz", {"train": 6, "val": 2, "test": 4}, copy=("train", 1, "test", 2, 0))
    result, out = check_cli(npz, "--folds", "2", "--exact-only")
    assert result.exit_code == 1, out
    assert "exact duplicates across splits with conflicting labels:" in out
    assert "#train/1 [1]" in out and "#test/2 [0]" in out


def test_data_check_refuses_an_unknown_split_option(tmp_path):
    npz = write_npz(tmp_path / "breastmnist.npz", {"train": 6, "test": 4})
    cfg = tiny_config(tmp_path, datasets=[{"name": "breast", "source": "medmnist", "path": str(npz),
                                           "options": {"split": "offical"}}])
    result, out = check_cli(cfg)
    assert result.exit_code == 2 and "options.split must be official or merged, not 'offical'" in out


# --------------------------------------------------------------------------- fold advice (issue 38)
@pytest.mark.parametrize("n_folds", [2, 5])
def test_one_image_class_advice_does_not_suggest_a_fold_count(n_folds):
    labels = np.array([0, 0, 0, 0, 0, 1])
    with pytest.raises(DataError) as err:
        check_foldable(labels, None, ["benign", "rare"], n_folds, "d")
    msg = str(err.value)
    assert "class 'rare' has 1 image," in msg and "folds:" not in msg
    assert "at least 2 images" in msg and "add images of 'rare' or merge the class" in msg


def test_one_patient_class_advice_names_patients():
    labels = np.array([0, 0, 0, 0, 1, 1])
    groups = np.array(["a", "b", "c", "d", "e", "e"], dtype=object)
    with pytest.raises(DataError, match=r"class 'rare' has 1 patient, .*at least 2 patients.*add patients"):
        check_foldable(labels, groups, ["benign", "rare"], 2, "d")


def test_few_images_class_advice_suggests_a_smaller_fold_count():
    labels = np.array([0] * 6 + [1] * 3)
    with pytest.raises(DataError,
                       match=r"class 'rare' has 3 images, fewer than the 5 folds asked for\. Use `folds: 3`"):
        check_foldable(labels, None, ["benign", "rare"], 5, "d")


# --------------------------------------------------------------------------- folders: links and hidden folders
def test_symlinked_subfolder_is_followed(tmp_path):
    data = folder(tmp_path / "d")
    extra = folder(tmp_path / "more", n=2)
    os.symlink(extra / "benign", data / "benign" / "linked")
    table = load_folder(data, 16)
    assert len(table) == 8 and any("linked" in p for p in table.paths)


def test_symlink_loop_is_skipped_with_a_warning(tmp_path):
    data = folder(tmp_path / "d")
    os.symlink(data / "benign", data / "benign" / "loop")
    with pytest.warns(UserWarning, match=r"loop: a symbolic link back to .*benign.*skipped"):
        table = load_folder(data, 16)
    assert len(table) == 6


def test_broken_symlink_is_named(tmp_path):
    data = folder(tmp_path / "d")
    os.symlink(tmp_path / "gone.png", data / "benign" / "moved.png")
    with pytest.raises(DataError, match=r"moved\.png: a broken symbolic link \(to .*gone\.png\)"):
        load_folder(data, 16)


def test_images_in_hidden_folders_are_not_data(tmp_path):
    data = folder(tmp_path / "d")
    write_png(data / "benign" / ".ipynb_checkpoints" / "benign_0-checkpoint.png", seed=7)
    assert len(load_folder(data, 16)) == 6


def test_exif_orientation_is_applied(tmp_path):
    """A phone or scanner JPEG stored sideways with an EXIF rotation: viewers show it upright, and so
    must training, or the network learns from images turned unlike the ones the labeller saw."""
    arr = np.zeros((24, 48, 3), np.uint8)
    arr[:, :24] = 255  # left half white as stored
    img = Image.fromarray(arr)
    exif = img.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    img.save(tmp_path / "rot.jpg", exif=exif, quality=95)
    from medtune.data.loaders import decode_image

    out = decode_image(tmp_path / "rot.jpg", 24)
    assert out[0, :4].mean() > 200 and out[0, -4:].mean() < 50  # displayed: white on top, black below


# --------------------------------------------------------------------------- malformed .npz files
def npz_with(tmp_path: Path, **arrays) -> Path:
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    return path


X = np.random.default_rng(0).integers(0, 256, (6, 28, 28), dtype=np.uint8)
Y = (np.arange(6) % 2).reshape(-1, 1)


@pytest.mark.parametrize("arrays, message", [
    ({"train_images": X, "train_labels": Y[:4]}, r"`train_images` has 6 images but `train_labels` has 4 labels"),
    ({"train_images": X, "train_labels": Y - 1}, r"`train_labels` holds negative values \(-1\); labels are class "
                                                  r"indices 0, 1, \.\.\."),
    ({"train_images": X, "train_labels": Y + 0.5}, r"`train_labels` holds non-integer values \(0\.5\)"),
    ({"train_images": X, "train_labels": Y, "test_images": X[:, :14, :14], "test_labels": Y},
     r"`test_images` are 14x14 but `train_images` are 28x28; every split needs one image size"),
    ({"train_images": X[:0], "train_labels": Y[:0]}, r"holds no images"),
    ({"train_images": np.array([X[0], X[1][:3]], dtype=object), "train_labels": Y[:2]},
     r"`train_images` is stored as Python objects"),
])
def test_malformed_npz_is_named(tmp_path, arrays, message):
    with pytest.raises(DataError, match=r"bad\.npz: " + message):
        load_npz(npz_with(tmp_path, **arrays), 28)


def test_text_file_named_npz(tmp_path):
    path = tmp_path / "notes.npz"
    path.write_text("hello")
    with pytest.raises(DataError, match=r"notes\.npz: not a .npz file \(a zip of NumPy arrays\)"):
        load_npz(path, 28)


def test_npz_data_check_lists_malformed_file_as_one_paragraph(tmp_path):
    result, out = check_cli(npz_with(tmp_path, train_images=X, train_labels=Y[:4]))
    assert result.exit_code == 2 and "has 6 images but `train_labels` has 4 labels" in out


# --------------------------------------------------------------------------- manifests: malformed files
@pytest.mark.parametrize("rows, message", [
    (["benign/benign_0.png,benign,left,extra"],
     r"line 5: 4 field\(s\) where the header has 2; quote values that contain commas"),
    (["benign/benign_0.png"],
     r"line 5: 1 field\(s\) where the header has 2"),
    (["benign/benign_0.png,"],
     r"line 5: empty label"),
    (['"benign/benign_0.png,benign', "benign/benign_2.png,benign"],
     r'line 5: a field opens a quote \(\"\) that does not close'),
    (["benign,benign"],
     r"line 5: 'benign' is a folder, not an image file"),
])
def test_a_malformed_manifest_row_is_named_by_its_line(tmp_path, rows, message):
    """Extra or missing fields, a blank label, an unclosed quote, a folder: each names its line."""
    f = manifest(tmp_path / "d", [*BASE_ROWS, *rows])
    with pytest.raises(DataError, match=message):
        load_manifest(f, 16)


def test_manifest_line_numbers_count_blank_lines(tmp_path):
    f = manifest(tmp_path / "d", ["", *BASE_ROWS, "", "benign/gone.png,benign"])
    with pytest.raises(DataError, match=r"line 7: file 'benign/gone\.png' does not exist"):
        load_manifest(f, 16)


def test_manifest_repeated_header_column_is_refused(tmp_path):
    f = manifest(tmp_path / "d", [r + ",x" for r in BASE_ROWS], header="path,label,label")
    with pytest.raises(DataError, match=r"column\(s\) label appear more than once in the header"):
        load_manifest(f, 16)


def test_manifest_path_that_is_a_folder(tmp_path):
    data = folder(tmp_path / "d")
    with pytest.raises(DataError, match=r"manifest .*d is a folder; a manifest is a \.csv file.*source: folder"):
        load_manifest(data, 16)


@pytest.mark.parametrize("header, hint", [("Path,Label", "Column names are lower case"),
                                          ("path;label", "another separator than commas")])
def test_manifest_header_hints(tmp_path, header, hint):
    f = manifest(tmp_path / "d", [r.replace(",", ";" if ";" in header else ",") for r in BASE_ROWS], header=header)
    with pytest.raises(DataError, match=hint):
        load_manifest(f, 16)


def test_manifest_with_bom_and_windows_line_endings(tmp_path):
    folder(tmp_path / "d")
    f = tmp_path / "d" / "m.csv"
    f.write_bytes(b"\xef\xbb\xbf" + "\r\n".join(["path,label", *BASE_ROWS, ""]).encode())
    table = load_manifest(f, 16)
    assert len(table) == 3 and table.class_names == ["benign", "malignant"]


def test_manifest_columns_reports_a_malformed_row(tmp_path):
    from medtune.data.loaders import manifest_columns

    f = manifest(tmp_path / "d", [r + ",s1" for r in BASE_ROWS] + ["benign/benign_0.png,benign,s2,extra"],
                 header="path,label,site")
    with pytest.raises(DataError, match=r"line 5: 4 field\(s\) where the header has 3"):
        manifest_columns(f, ["site"])


def test_group_pattern_on_a_manifest_says_where_patient_ids_go(tmp_path):
    from medtune.data.loaders import load_dataset

    f = manifest(tmp_path / "d", BASE_ROWS)
    with pytest.raises(DataError, match=r"group_pattern reads patient ids from the file names of a folder data set; "
                                        r"a manifest gives them in a `patient_id` column"):
        load_dataset(f, image_size=16, name="m", group_pattern="^(P\\d+)")


# --------------------------------------------------------------------------- odd pixels and stray files
@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_float_image_with_a_non_finite_pixel_keeps_its_range(tmp_path, bad):
    from medtune.data.loaders import decode_image

    arr = np.linspace(0.0, 1.0, 16 * 16, dtype=np.float32).reshape(16, 16)
    arr[0, 0] = bad
    Image.fromarray(arr).save(tmp_path / "f.tiff")
    out = decode_image(tmp_path / "f.tiff", 16)
    assert out[0, 0, 0] == 0 and out[0, -1, -1] == 255 and len(np.unique(out[0])) > 200


def test_images_beside_the_class_folders_are_named_not_silently_ignored(tmp_path):
    data = folder(tmp_path / "d")
    write_png(data / "stray.png", seed=9)
    with pytest.warns(UserWarning, match=r"1 image file\(s\) sit directly in .*d, outside the class sub-folders, "
                                         r"e\.g\. stray\.png; they are not used"):
        assert len(load_folder(data, 16)) == 6


def test_run_warns_when_identical_images_carry_different_labels(tmp_path):
    from medtune.data.splits import apply_duplicate_policy

    data = folder(tmp_path / "d")
    (data / "malignant" / "copy.png").write_bytes((data / "benign" / "benign_0.png").read_bytes())
    table = load_folder(data, 16)
    with pytest.warns(UserWarning, match=r"1 group\(s\) of identical images carry different labels, e\.g\. "
                                         r".*benign_0\.png \[benign\] = .*copy\.png \[malignant\]"):
        apply_duplicate_policy(table, "group")


def test_multi_page_tiff_says_what_to_do(tmp_path):
    from medtune.data.loaders import decode_image

    frames = [Image.new("L", (16, 16), v) for v in (0, 80, 160)]
    frames[0].save(tmp_path / "stack.tif", save_all=True, append_images=frames[1:])
    with pytest.raises(DataError, match=r"stack\.tif: has 3 frames; medtune expects one 2-D image per file\. Save "
                                        r"each frame .* as its own file"):
        decode_image(tmp_path / "stack.tif", 16)


def test_many_repeated_rows_are_one_warning(tmp_path):
    """A manifest pasted in twice must not print a warning per row."""
    import warnings

    rows = ["benign/benign_0.png,benign", *BASE_ROWS]
    f = manifest(tmp_path / "d", rows + rows)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        table = load_manifest(f, 16)
    notes = [str(w.message) for w in caught if "repeat" in str(w.message)]
    assert len(table) == 4 and len(notes) == 1
    assert "4 rows repeat earlier rows word for word (line 6 repeats line 2" in notes[0] and "; and 1 more)" in notes[0]


def test_npz_labels_beyond_the_flags_classes(tmp_path):
    path = npz_with(tmp_path, train_images=X, train_labels=np.arange(6) % 3)
    with pytest.raises(DataError, match=r"bad\.npz: labels go up to 2, but the data set has 2 classes \(a, b\)"):
        load_npz(path, 28, class_names=["a", "b"])
