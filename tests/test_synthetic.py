import numpy as np

from medtune.data.synthetic import CLASS_NAMES, make_ultrasound


def test_deterministic_by_seed_and_grouped_by_patient():
    a = make_ultrasound(n_patients=8, images_per_patient=3, size=40, seed=3)
    b = make_ultrasound(n_patients=8, images_per_patient=3, size=40, seed=3)
    c = make_ultrasound(n_patients=8, images_per_patient=3, size=40, seed=4)
    assert a.images.equal(b.images) and not a.images.equal(c.images)
    assert a.class_names == CLASS_NAMES
    assert len(set(a.groups)) == 8 and len(a) == 24
    for g in set(a.groups):  # one class per patient
        assert len(set(a.labels[a.groups == g])) == 1
    counts = np.bincount(a.labels, minlength=len(CLASS_NAMES))
    assert len(counts) == len(CLASS_NAMES) and counts.sum() == 24
    # every class has patients, and whole patients (3 images each) make up each class
    assert counts.min() >= 3 and all(c % 3 == 0 for c in counts), counts


def test_lesion_classes_differ_from_normal_in_the_centre():
    """Lesions are hypoechoic masses: mean intensity around the lesion area is darker than normal tissue."""
    t = make_ultrasound(n_patients=30, images_per_patient=2, size=64, seed=0, difficulty=0.0)
    centre = t.images[:, 0, 20:44, 16:48].float().mean(dim=(1, 2)).numpy()
    normal = centre[t.labels == CLASS_NAMES.index("normal")].mean()
    lesion = centre[t.labels != CLASS_NAMES.index("normal")].mean()
    assert lesion < normal
