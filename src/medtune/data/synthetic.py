"""Generated B-mode-like breast ultrasound: the embedded default data set.

Three classes as in BUSI, with the textbook (BI-RADS) cues a radiologist reads:
- normal: layered tissue, no lesion (a few small fat lobules as distractors);
- benign: oval, circumscribed, wider-than-tall hypoechoic mass with posterior enhancement;
- malignant: irregular or spiculated, taller-than-wide mass with posterior shadowing.
Speckle is multiplicative Rayleigh noise, log-compressed, as in envelope-detected ultrasound.
Each synthetic patient contributes several images (same tissue, same lesion, other probe
positions), so patient-grouped folds matter here exactly as on real data.

`difficulty` (0..1) blurs the class cues (overlapping aspect ratios, margins and posterior
features, weaker contrast, more speckle) so that a pretrained linear probe stays clearly below
100% accuracy at the default 0.6.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.ndimage import uniform_filter

from medtune.data.table import ImageTable

CLASS_NAMES = ["benign", "malignant", "normal"]
BUSI_PROPORTIONS = (0.56, 0.27, 0.17)


def _smooth_noise(rng: np.random.Generator, size: int, scale: int) -> np.ndarray:
    """Low-frequency field in [-1, 1]: coarse Gaussian noise upsampled bilinearly."""
    coarse = rng.normal(size=(scale + 1, scale + 1))
    t = torch.from_numpy(coarse)[None, None]
    up = torch.nn.functional.interpolate(t, size=(size, size), mode="bicubic", align_corners=True)[0, 0].numpy()
    return up / (np.abs(up).max() + 1e-9)


def _blur(x: np.ndarray, k: int) -> np.ndarray:
    """Separable box blur; gives speckle its correlation length."""
    return uniform_filter(x, size=k, mode="reflect") if k > 1 else x


def _lesion_mask(yy, xx, cy, cx, ry, rx, rough: np.ndarray, angle: float) -> np.ndarray:
    """Soft mask of a lesion whose radius varies with angle by `rough` (Fourier amplitudes)."""
    dy, dx = yy - cy, xx - cx
    ca, sa = np.cos(angle), np.sin(angle)
    u, v = dx * ca + dy * sa, -dx * sa + dy * ca
    theta = np.arctan2(v / ry, u / rx)
    r = np.sqrt((u / rx) ** 2 + (v / ry) ** 2)
    wobble = np.ones_like(theta)
    for k, amp in enumerate(rough, start=2):
        wobble += amp * np.cos(k * theta + 1.7 * k)
    return 1.0 / (1.0 + np.exp((r - wobble) * 14.0))


def _image(rng: np.random.Generator, size: int, cls: str, patient: dict, difficulty: float) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64) / size
    # Tissue: skin line, subcutaneous fat, glandular layer, deeper tissue; patient-specific depths.
    depth = yy + 0.03 * patient["tilt"] * (xx - 0.5) + 0.02 * _smooth_noise(rng, size, 3)
    echo = np.full((size, size), 0.35)
    echo += 0.55 * np.exp(-((depth - patient["skin"]) / 0.012) ** 2)
    echo += np.where(depth > patient["fat"], 0.25 * patient["gland_gain"], 0.0)
    echo += np.where(depth > patient["deep"], -0.15, 0.0)
    echo *= 1.0 + 0.25 * _smooth_noise(rng, size, 6)
    # Fat lobules: small dark ovals in every class, distractors for a lazy classifier.
    for _ in range(rng.integers(1, 4)):
        cy, cx = rng.uniform(0.2, 0.8), rng.uniform(0.1, 0.9)
        m = _lesion_mask(yy, xx, cy, cx, rng.uniform(0.02, 0.05), rng.uniform(0.04, 0.08), np.zeros(0), 0.0)
        echo *= 1.0 - 0.35 * m
    if cls != "normal":
        les = patient["lesion"]
        cy = les["cy"] + rng.normal(0, 0.03)
        cx = les["cx"] + rng.normal(0, 0.05)
        scale = rng.uniform(0.85, 1.15)
        ry, rx = les["ry"] * scale, les["rx"] * scale
        m = _lesion_mask(yy, xx, cy, cx, ry, rx, les["rough"], les["angle"] + rng.normal(0, 0.05))
        echo = echo * (1.0 - les["contrast"] * m) + 0.04 * m
        # Posterior acoustic feature: a column below the lesion, enhancement (>0) or shadow (<0).
        col = np.exp(-((xx - cx) / (rx * 0.9)) ** 2) * (yy > cy + ry * 0.6)
        fade = np.exp(-np.clip(yy - cy - ry, 0, None) / 0.35)
        echo *= 1.0 + les["posterior"] * col * fade
    # Depth attenuation + time-gain compensation left imperfect.
    echo *= np.exp(-patient["atten"] * yy)
    echo = np.clip(echo, 0.01, None)
    speckle = rng.rayleigh(scale=1.0, size=(size, size))
    speckle = _blur(speckle, patient["speckle_len"])
    intensity = echo * speckle * (1.0 + 0.8 * difficulty * rng.normal(0, 0.15, size=(size, size)))
    img = np.log1p(np.clip(intensity, 0, None) * 6.0) / np.log1p(6.0 * 2.2)
    # Sector-free linear probe: dark band at the top (gel) and a vignette at the sides.
    img *= np.clip((yy - 0.03) / 0.03, 0, 1) * (1.0 - 0.25 * np.abs(xx - 0.5) ** 2 * 4)
    img = np.clip(img * patient["gain"], 0, 1)
    return (img * 255).round().astype(np.uint8)


def _patient(rng: np.random.Generator, cls: str, difficulty: float) -> dict:
    d = difficulty
    p = dict(
        tilt=rng.normal(0, 1), skin=rng.uniform(0.06, 0.1), fat=rng.uniform(0.18, 0.32),
        deep=rng.uniform(0.65, 0.85), gland_gain=rng.uniform(0.6, 1.4), atten=rng.uniform(0.2, 0.7),
        gain=rng.uniform(0.85, 1.2), speckle_len=int(rng.integers(2, 4)),
    )
    if cls == "normal":
        return p
    benign = cls == "benign"
    # Cues drawn from class-specific ranges that overlap more as difficulty grows.
    width = rng.uniform(0.08, 0.16)
    if benign:
        aspect = rng.uniform(0.45 + 0.4 * d, 0.8 + 0.35 * d)  # height / width: wider than tall
        rough = rng.uniform(0, 0.03 + 0.08 * d, size=2)
        posterior = rng.uniform(0.15 - 0.3 * d, 0.5 - 0.2 * d)
    else:
        aspect = rng.uniform(1.25 - 0.45 * d, 1.7 - 0.3 * d)  # taller than wide
        spiky = rng.random() < 0.5
        rough = rng.uniform(0.06 - 0.04 * d, 0.14 - 0.04 * d, size=5 if spiky else 3)
        posterior = rng.uniform(-0.55 + 0.2 * d, -0.15 + 0.3 * d)
    p["lesion"] = dict(
        cy=rng.uniform(0.35, 0.6), cx=rng.uniform(0.3, 0.7), rx=width, ry=width * aspect, rough=rough,
        angle=rng.normal(0, 0.15), contrast=rng.uniform(0.75 - 0.45 * d, 0.95 - 0.3 * d), posterior=posterior,
    )
    return p


def make_ultrasound(n_patients: int = 60, images_per_patient: int = 4, size: int = 224, seed: int = 0,
                    difficulty: float = 0.6, proportions: tuple[float, float, float] = BUSI_PROPORTIONS) -> ImageTable:
    """Deterministic by `seed`: same arguments, same bytes. Every class gets at least 2 patients."""
    if n_patients < 6:
        raise ValueError("n_patients must be at least 6 (two per class)")
    rng = np.random.default_rng(seed)
    counts = np.maximum(2, np.round(np.asarray(proportions) / np.sum(proportions) * n_patients).astype(int))
    counts[0] += n_patients - counts.sum()
    images, labels, groups, paths = [], [], [], []
    pid = 0
    for label, (cls, k) in enumerate(zip(CLASS_NAMES, counts)):
        for _ in range(k):
            patient = _patient(rng, cls, difficulty)
            for j in range(images_per_patient):
                gray = _image(rng, size, cls, patient, difficulty)
                images.append(np.repeat(gray[None], 3, axis=0))
                labels.append(label)
                groups.append(f"P{pid:03d}")
                paths.append(f"synthetic://seed{seed}/P{pid:03d}/{cls}_{j}")
            pid += 1
    return ImageTable(
        images=torch.from_numpy(np.stack(images)), labels=np.asarray(labels, dtype=np.int64),
        class_names=list(CLASS_NAMES), paths=paths, groups=np.asarray(groups, dtype=object),
        name="synthetic_ultrasound",
    )
