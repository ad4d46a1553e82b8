"""Property-based tests (hypothesis) for loaders, splits and metrics, and a seeded fuzz pass over
image decoding: a mutated file must decode to (3, S, S) uint8 or raise DataError, nothing else."""

from __future__ import annotations

import io
import math
import random

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from PIL import Image

from medtune.data.loaders import decode_image
from medtune.errors import DataError
from medtune.evaluation.metrics import clinical_metrics
from medtune.data.splits import kfold

FAST = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


# --------------------------------------------------------------------------- loaders
@FAST
@given(st.integers(1, 24).flatmap(lambda s: arrays(np.uint8, (s, s, 3))))
def test_png_round_trip_rgb(tmp_path, arr):
    f = tmp_path / "x.png"
    Image.fromarray(arr).save(f)
    out = decode_image(f, arr.shape[0])
    assert out.dtype == np.uint8 and np.array_equal(out, arr.transpose(2, 0, 1))


@FAST
@given(st.integers(1, 24).flatmap(lambda s: arrays(np.uint8, (s, s))))
def test_png_round_trip_gray(tmp_path, arr):
    f = tmp_path / "g.png"
    Image.fromarray(arr).save(f)
    out = decode_image(f, arr.shape[0])
    assert all(np.array_equal(out[c], arr) for c in range(3))


# --------------------------------------------------------------------------- splits
@st.composite
def labelled(draw, grouped: bool):
    k = draw(st.integers(2, 5))
    n_classes = draw(st.integers(2, 3))
    counts = [draw(st.integers(k, 12)) for _ in range(n_classes)]
    labels = np.repeat(np.arange(n_classes), counts)
    perm = np.random.default_rng(draw(st.integers(0, 2**16))).permutation(len(labels))
    labels = labels[perm]
    groups = None
    if grouped:
        # patients inside one class (a patient has one diagnosis), 1-3 images each
        sizes = draw(st.lists(st.integers(1, 3), min_size=len(labels), max_size=len(labels)))
        groups = np.empty(len(labels), dtype=object)
        for c in range(n_classes):
            idx = np.flatnonzero(labels == c)
            pid, left = 0, 0
            for i in idx:
                if left == 0:
                    pid, left = pid + 1, sizes[i]
                groups[i] = f"c{c}p{pid}"
                left -= 1
        units = min(len(set(groups[labels == c])) for c in range(n_classes))
        k = min(k, units) if units >= 2 else 2
        if units < 2:
            groups = None
    return labels, groups, k, draw(st.integers(0, 1000))


def check_partition(labels, groups, folds):
    tested = np.concatenate([te for _, te in folds])
    assert sorted(tested) == list(range(len(labels)))  # every sample tested exactly once
    for tr, te in folds:
        assert not set(tr) & set(te)
        assert len(tr) + len(te) == len(labels)
        if groups is not None:
            assert not set(groups[tr]) & set(groups[te])  # a patient never straddles


@FAST
@given(labelled(grouped=False))
def test_kfold_partition_and_stratification(case):
    labels, _, k, seed = case
    folds = kfold(labels, None, k, seed)
    assert len(folds) == k
    check_partition(labels, None, folds)
    for c in np.unique(labels):
        n_c = int(np.sum(labels == c))
        per_fold = [int(np.sum(labels[te] == c)) for _, te in folds]
        assert max(per_fold) - min(per_fold) <= 1 and sum(per_fold) == n_c


@FAST
@given(labelled(grouped=True))
def test_group_kfold_partition(case):
    labels, groups, k, seed = case
    folds = kfold(labels, groups, k, seed)
    check_partition(labels, groups, folds)


# --------------------------------------------------------------------------- metrics
@st.composite
def predictions(draw):
    k = draw(st.integers(2, 4))
    n = draw(st.integers(k, 40))
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    y = np.concatenate([np.arange(k), rng.integers(0, k, n - k)])  # every class present
    probs = rng.dirichlet(np.ones(k), size=n)
    return y, probs, [f"c{i}" for i in range(k)]


BOUNDED = ["accuracy", "balanced_accuracy", "sensitivity", "specificity", "ppv", "npv", "f1", "auc"]


@FAST
@given(predictions())
def test_metrics_bounded(case):
    y, probs, names = case
    m = clinical_metrics(y, probs, names)
    for key, v in m.items():
        if key.endswith("_undefined"):  # a count of classes, flagged beside the macro PPV/NPV
            assert 0 <= v <= len(names), (key, v)
        elif key != "n" and not math.isnan(v):
            top = 2.0 if key == "brier" else 1.0  # the multiclass Brier score sums over classes: [0, 2]
            assert 0.0 <= v <= top, (key, v)
    assert all(not math.isnan(m[k]) for k in ("accuracy", "balanced_accuracy", "f1", "auc"))


@FAST
@given(predictions())
def test_metrics_agree_with_scikit_learn(case):
    """Accuracy, balanced accuracy and AUC against scikit-learn on the same inputs (binary: the second
    class is positive by default; more classes: one-vs-rest macro AUC)."""
    from sklearn.metrics import accuracy_score, balanced_accuracy_score, roc_auc_score

    y, probs, names = case
    m = clinical_metrics(y, probs, names)
    pred = probs.argmax(1)
    assert m["accuracy"] == pytest.approx(accuracy_score(y, pred), abs=1e-12)
    assert m["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y, pred), abs=1e-12)
    if len(names) == 2:
        expected_auc = roc_auc_score(y == 1, probs[:, 1])
    else:
        expected_auc = roc_auc_score(y, probs, multi_class="ovr", average="macro", labels=list(range(len(names))))
    assert m["auc"] == pytest.approx(expected_auc, abs=1e-12)


@FAST
@given(predictions(), st.integers(0, 2**16))
def test_metrics_permutation_invariant(case, seed):
    y, probs, names = case
    perm = np.random.default_rng(seed).permutation(len(y))
    a, b = clinical_metrics(y, probs, names), clinical_metrics(y[perm], probs[perm], names)
    assert a.keys() == b.keys()
    for key in a:
        assert (math.isnan(a[key]) and math.isnan(b[key])) or a[key] == pytest.approx(b[key], abs=1e-12)


@FAST
@given(predictions())
def test_metrics_perfect_predictions(case):
    y, _, names = case
    probs = np.eye(len(names))[y] * 0.9 + 0.1 / len(names)
    m = clinical_metrics(y, probs, names)
    for key in BOUNDED:
        assert m[key] == pytest.approx(1.0), key


# --------------------------------------------------------------------------- fuzzing
def valid_files() -> dict[str, bytes]:
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, (20, 28, 3), dtype=np.uint8)
    out = {}
    for fmt, mode in (("PNG", "RGB"), ("PNG", "L"), ("PNG", "P"), ("JPEG", "RGB"), ("JPEG", "L")):
        buf = io.BytesIO()
        Image.fromarray(arr).convert(mode).save(buf, format=fmt)
        out[f"{fmt}-{mode}"] = buf.getvalue()
    return out


def mutate(data: bytes, rng: random.Random) -> bytes:
    b = bytearray(data)
    op = rng.randrange(4)
    if op == 0:  # flip random bits
        for _ in range(rng.randint(1, 8)):
            i = rng.randrange(len(b))
            b[i] ^= 1 << rng.randrange(8)
    elif op == 1:  # truncate
        b = b[: rng.randrange(len(b))]
    elif op == 2:  # overwrite a run with random bytes
        i = rng.randrange(len(b))
        for j in range(i, min(len(b), i + rng.randint(1, 32))):
            b[j] = rng.randrange(256)
    else:  # corrupt the header region, where sizes and chunk lengths live
        for _ in range(rng.randint(1, 4)):
            i = rng.randrange(min(len(b), 64))
            b[i] = rng.randrange(256)
    return bytes(b)


def test_fuzz_decode_image(tmp_path):
    rng = random.Random(1234)
    files = valid_files()
    outcomes = {"ok": 0, "DataError": 0}
    for case in range(400):
        name, data = rng.choice(sorted(files.items()))
        f = tmp_path / f"fuzz{case}.{'png' if name.startswith('PNG') else 'jpg'}"
        f.write_bytes(mutate(data, rng))
        try:
            out = decode_image(f, 16, max_pixels=10_000)
        except DataError as exc:
            assert f.name in str(exc)
            outcomes["DataError"] += 1
        else:  # any other exception fails the test with its traceback
            assert out.shape == (3, 16, 16) and out.dtype == np.uint8, (case, name)
            outcomes["ok"] += 1
    assert outcomes["ok"] > 20 and outcomes["DataError"] > 20, outcomes
