import numpy as np
import pytest
import torch

from medtune.data.loaders import ImageTable
from medtune.errors import DataError
from medtune.data.splits import apply_duplicate_policy, check_foldable, inner_split, kfold


def table_with_duplicates():
    imgs = torch.randint(0, 255, (12, 3, 8, 8), dtype=torch.uint8)
    imgs[5] = imgs[0]  # identical image filed twice
    imgs[11] = imgs[6]
    labels = np.array([0] * 6 + [1] * 6)
    return ImageTable(imgs, labels, ["a", "b"], [f"f{i}.png" for i in range(12)])


def test_group_policy_keeps_duplicates_in_one_fold():
    t, groups, rec = apply_duplicate_policy(table_with_duplicates(), "group")
    assert rec["duplicate_groups"] == 2 and rec["duplicate_images"] == 2
    assert groups[0] == groups[5] and groups[6] == groups[11]
    for tr, te in kfold(t.labels, groups, 3, seed=0):
        assert not ({t.digests[i] for i in tr} & {t.digests[i] for i in te})


def test_error_and_drop_policies():
    with pytest.raises(DataError, match=r"2 groups of identical images.*f0.png = f5.png"):
        apply_duplicate_policy(table_with_duplicates(), "error")
    t, _, _ = apply_duplicate_policy(table_with_duplicates(), "drop")
    assert len(t) == 10


def test_patients_never_straddle_folds_and_every_image_is_tested_once():
    labels = np.array([0, 0, 0, 0, 1, 1, 1, 1, 0, 0, 1, 1] * 2)
    groups = np.array([f"p{i // 2}" for i in range(24)], dtype=object)
    seen = []
    for tr, te in kfold(labels, groups, 3, seed=1):
        assert not set(groups[tr]) & set(groups[te])
        seen += list(te)
    assert sorted(seen) == list(range(24))
    fit, val = inner_split(np.arange(24), labels, groups, 0.25, seed=0)
    assert not set(groups[fit]) & set(groups[val]) and len(val) > 0


def test_class_smaller_than_folds_is_refused_with_advice():
    with pytest.raises(DataError, match=r"class 'b' has 2 images, fewer than the 5 folds.*folds: 2"):
        check_foldable(np.array([0] * 10 + [1] * 2), None, ["a", "b"], 5, "mydata")


# --------------------------------------------------------------------------- cv: by_site
from medtune.data.splits import by_site  # noqa: E402


def test_by_site_leaves_each_site_out_once():
    labels = np.array([0, 1, 0, 1, 0, 1, 0, 1, 0, 1])
    sites = np.array(["b", "b", "a", "a", "c", "c", "a", "b", "c", "a"], dtype=object)
    folds = by_site(labels, None, sites, "t")
    assert [sorted(set(sites[te])) for _, te in folds] == [["a"], ["b"], ["c"]]
    for tr, te in folds:
        assert not set(sites[tr]) & set(sites[te]) and len(tr) + len(te) == len(labels)


def test_by_site_refuses_a_patient_at_two_sites_and_a_site_holding_a_whole_class():
    labels = np.array([0, 1, 0, 1])
    with pytest.raises(DataError, match="more than one site"):
        by_site(labels, np.array(["p1", "p2", "p1", "p3"], dtype=object),
                np.array(["a", "a", "b", "b"], dtype=object), "t")
    with pytest.raises(DataError, match="lacks class"):
        by_site(np.array([0, 0, 1, 0]), None, np.array(["a", "a", "b", "a"], dtype=object), "t")
    with pytest.raises(DataError, match="at least 2 sites"):
        by_site(labels, None, np.array(["a"] * 4, dtype=object), "t")
