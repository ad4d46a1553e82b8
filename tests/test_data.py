import numpy as np
import pytest
from PIL import Image

from medtune.data.loaders import decode_image, load_dataset, load_folder, load_manifest, manifest_columns
from medtune.errors import DataError


def write_png(path, value=128, size=(20, 16), mode="L"):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, value).save(path)
    return path


def test_folder_loader_decodes_once_and_keeps_names(tmp_path):
    for c, v in (("benign", 50), ("malignant", 200)):
        for i in range(3):
            write_png(tmp_path / c / f"P{i}_{c}.png", v + i)
    t = load_folder(tmp_path, 32, group_pattern=r"^(P\d+)_")
    assert t.images.shape == (6, 3, 32, 32) and t.class_names == ["benign", "malignant"]
    assert list(t.labels) == [0, 0, 0, 1, 1, 1]
    assert set(t.groups) == {"P0", "P1", "P2"}
    assert int(t.images[3, 0, 0, 0]) == 200 and int(t.images[3, 2, 5, 5]) == 200  # gray -> 3 channels


def test_manifest_loader_with_patients(tmp_path):
    for i in range(4):
        write_png(tmp_path / "img" / f"{i}.png", i * 40)
    (tmp_path / "m.csv").write_text("path,label,patient_id\n"
                                    "img/0.png,a,p1\nimg/1.png,b,p1\nimg/2.png,a,p2\nimg/3.png,b,p3\n")
    t = load_manifest(tmp_path / "m.csv", 16)
    assert t.class_names == ["a", "b"] and list(t.labels) == [0, 1, 0, 1] and list(t.groups) == ["p1", "p1", "p2", "p3"]


def test_npz_merges_splits_and_keeps_the_official_split(tmp_path):
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "m.npz", train_images=rng.integers(0, 255, (6, 28, 28), dtype=np.uint8),
             train_labels=np.array([[0], [1], [0], [1], [0], [1]]),
             test_images=rng.integers(0, 255, (2, 28, 28), dtype=np.uint8),
             test_labels=np.array([[0], [1]]))
    t = load_dataset(tmp_path / "m.npz", image_size=32)
    assert t.images.shape == (8, 3, 32, 32) and list(t.split) == ["train"] * 6 + ["test"] * 2


def test_bad_files_are_collected_into_one_error_naming_each(tmp_path):
    write_png(tmp_path / "a" / "ok.png")
    write_png(tmp_path / "b" / "ok.png")
    (tmp_path / "a" / "empty.png").write_bytes(b"")
    (tmp_path / "b" / "notes.png").write_text("not an image")
    with pytest.raises(DataError) as err:
        load_folder(tmp_path, 16)
    msg = str(err.value)
    assert "2 of 4 image files" in msg and "empty.png" in msg and "0 bytes" in msg and "notes.png" in msg


def test_missing_folder_and_single_class(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_folder(tmp_path / "nope", 16)
    write_png(tmp_path / "only" / "x.png")
    with pytest.raises(DataError, match="only one class"):
        load_folder(tmp_path, 16)


def test_manifest_refuses_paths_outside_its_folder(tmp_path):
    write_png(tmp_path / "secret.png")
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "m.csv").write_text("path,label\n../secret.png,a\n")
    with pytest.raises(DataError, match="outside the manifest's folder"):
        load_manifest(tmp_path / "d" / "m.csv", 16)


def test_manifest_root_names_the_one_folder_its_paths_may_read(tmp_path):
    """A manifest kept apart from its images (options.root): paths resolve under root, the
    subgroup columns resolve the same way, and a path leaving root is still refused."""
    write_png(tmp_path / "images" / "a" / "x.png", 1)
    write_png(tmp_path / "images" / "b" / "y.png", 2)
    write_png(tmp_path / "secret.png", 3)
    (tmp_path / "meta").mkdir()
    m = tmp_path / "meta" / "m.csv"
    m.write_text("path,label,site\na/x.png,a,s1\nb/y.png,b,s2\n")
    table = load_manifest(m, 16, root=tmp_path / "images")
    assert table.class_names == ["a", "b"] and len(table.paths) == 2
    sites = manifest_columns(m, ["site"], root=tmp_path / "images")["site"]
    assert [sites[p] for p in table.paths] == ["s1", "s2"]
    m.write_text("path,label\na/x.png,a\n../secret.png,b\n")
    with pytest.raises(DataError, match=r"line 3: .* points outside options.root"):
        load_manifest(m, 16, root=tmp_path / "images")
    with pytest.raises(DataError, match="options.root .* is not a folder"):
        load_manifest(m, 16, root=tmp_path / "nowhere")


def test_modes_are_converted_not_rejected(tmp_path):
    arr16 = (np.arange(64, dtype=np.uint16).reshape(8, 8) * 1000)
    Image.fromarray(arr16).save(tmp_path / "x16.png")
    out = decode_image(tmp_path / "x16.png", 8)
    assert out.shape == (3, 8, 8) and out.max() == 255 and out.min() == 0
    Image.new("RGBA", (8, 8), (255, 0, 0, 255)).save(tmp_path / "rgba.png")
    assert tuple(decode_image(tmp_path / "rgba.png", 8)[:, 0, 0]) == (255, 0, 0)
    Image.new("CMYK", (8, 8), (0, 255, 255, 0)).save(tmp_path / "c.jpg")
    assert decode_image(tmp_path / "c.jpg", 8)[0].mean() > 200


def test_an_option_of_another_source_is_a_clear_error(tmp_path):
    """`root` is a manifest's option; on a folder it would collide with the loader's own argument."""
    write_png(tmp_path / "d" / "a" / "x.png", 1)
    write_png(tmp_path / "d" / "b" / "y.png", 2)
    with pytest.raises(DataError, match="option 'root' is not one this source takes"):
        load_dataset(tmp_path / "d", image_size=16, root=str(tmp_path))
