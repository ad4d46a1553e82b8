"""The experiment file: one YAML -> validated pydantic models, with errors that name the key.

Unknown keys are errors (a typo must not silently fall back to a default). `--set a.b=value`
overrides are applied to the raw YAML before validation, so they get the same checks.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from medtune.errors import ConfigError


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DatasetConfig(Strict):
    """A data set. `source: auto` infers folder / manifest (.csv) / npz from `path`."""

    name: str | None = Field(None, description="name in the store and reports; default: the last part of `path`")
    source: Literal["auto", "folder", "manifest", "npz", "synthetic", "dicom", "medmnist"] = Field(
        "auto", description="where images come from; docs/data.md lists each source's `options`")
    path: str | None = Field(None, description="folder (one sub-folder per class), .csv manifest, or .npz file")
    group_pattern: str | None = Field(None, description="regex whose first group reads a patient id from file names")
    positive: str | None = Field(None, description="positive class for sensitivity/specificity/PPV/NPV")
    duplicates: Literal["group", "error", "drop", "ignore"] = Field(
        "group", description="identical images: one group (default) | error | drop copies | ignore (leaky; to measure)")
    near_duplicates: int | None = Field(None, ge=0, le=32, description="also treat images within this many bits of "
                                        "perceptual hash (of 64) as duplicates; null = exact copies only")
    options: dict[str, Any] = Field(default_factory=dict, description="loader-specific options (e.g. synthetic sizes)")

    @model_validator(mode="after")
    def _needs_path(self) -> "DatasetConfig":
        if self.source not in ("synthetic", "medmnist") and not self.path:
            raise ValueError(f"data set {self.name or ''!r} needs `path` (a folder, a .csv manifest or a .npz file)")
        if self.source == "synthetic" and self.path:
            # e.g. `--set datasets.0.path=...` on the demo: training on generated images instead would be silent
            raise ValueError(f"data set {self.name or ''!r} has `source: synthetic` and a `path`; generated data "
                             "ignores paths. For your images set `source: auto` (or folder/manifest) and drop "
                             "`options`, e.g. --set 'datasets.0={path: DIR}'")
        return self

    def display_name(self) -> str:
        return self.name or (Path(self.path).name if self.path else self.source)


class BackboneConfig(Strict):
    name: str = Field(description="timm model name or a study alias (`medtune list backbones`)")
    pretrained: bool = Field(True, description="false = random init, asked for knowingly; true never falls back silently")
    checkpoint: str | None = Field(None, description="local .pth/.pt/.bin/.safetensors state dict to start from")
    image_size: int | None = Field(None, ge=16, le=1024, description="default: the weights' own input size")


class StrategyConfig(Strict):
    """A strategy and its hyperparameters; a list value sweeps (`blocks: [1, 2, 3]`)."""

    name: str = Field(description="registry key (`medtune list strategies`, docs/strategies.md)")
    params: dict[str, Any] = Field(default_factory=dict, description="hyperparameters; a list value sweeps")


class AugmentConfig(Strict):
    hflip: bool = Field(True, description="random horizontal flip")
    vflip: bool = Field(False, description="random vertical flip (off: anatomy usually has an up)")
    degrees: float = Field(10.0, ge=0, le=180, description="random rotation range, +- degrees")
    translate: float = Field(0.05, ge=0, le=0.5, description="random shift, fraction of the image size")
    scale: float = Field(0.1, ge=0, le=0.9, description="random zoom, +- fraction")
    brightness: float = Field(0.1, ge=0, le=1, description="random brightness change, +- fraction")
    contrast: float = Field(0.1, ge=0, le=1, description="random contrast change, +- fraction")


class TrainConfig(Strict):
    epochs: int = Field(10, ge=1, description="maximum epochs per cell")
    batch_size: int = Field(32, ge=2, description="images per step; lower it on out-of-memory errors")
    lr: float = Field(1e-3, gt=0, description="base learning rate (strategies scale it per block)")
    weight_decay: float = Field(1e-4, ge=0, description="AdamW weight decay")
    warmup_epochs: float = Field(1.0, ge=0, description="linear warm-up before the cosine decay")
    patience: int = Field(5, ge=1, description="early stopping: epochs without improvement on the inner validation split")
    val_fraction: float = Field(0.15, ge=0, lt=0.5, description="share of each training fold held out (by patient) for early stopping")
    class_weighted: bool = Field(False, description="weight the loss by inverse class frequency")
    balanced_sampler: bool = Field(False, description="sample batches with equal class frequency")
    views: int = Field(4, ge=1, description="a training image is shown plain with probability 1/views, else augmented; "
                       "the frozen-prefix cache holds the plain view and views-1 fixed augmented ones (1 = no augmentation)")
    cache: bool = Field(True, description="cache the output of frozen leading blocks (same results, much faster)")
    amp: Literal["auto", "on", "off"] = Field("auto", description="mixed precision: auto = bf16 on CUDA and bf16-capable CPUs, "
                                                        "with strided or wide depthwise convolutions kept in fp32 on a CPU "
                                                        "(measured faster there); on = bf16 everywhere")
    channels_last: bool = Field(True, description="channels-last memory layout (faster convolutions on GPU)")
    bn_statistics: Literal["update", "keep", "update_all"] = Field(
        "update", description="BatchNorm while training: update = a trained block's BatchNorm normalises with "
        "batch statistics (PyTorch's default), frozen blocks keep their pretrained ones; keep = every BatchNorm "
        "keeps its running statistics (eval mode; scale and shift still train), the Keras fine-tuning recipe, "
        "which pairs with lower learning rates (docs/strategies.md); update_all = frozen blocks update too "
        "(turns the feature cache off)")
    grad_clip: float = Field(5.0, ge=0, description="clip the gradient norm to this value; 0 = off")
    augment: AugmentConfig = Field(AugmentConfig(), description="training-time augmentation")

    @field_validator("amp", mode="before")
    @classmethod
    def _yaml_bool(cls, v: Any) -> Any:
        """YAML reads `amp: off` as False and `amp: on` as True."""
        return {False: "off", True: "on"}.get(v, v) if isinstance(v, bool) else v


class ExperimentConfig(Strict):
    name: str = Field("experiment", description="name of the experiment, saved with each run")
    # Every axis needs at least one entry: an empty one would make a grid of 0 cells that "succeeds".
    datasets: list[DatasetConfig] = Field(min_length=1, description="data sets; the grid's first axis")
    backbones: list[BackboneConfig] = Field(min_length=1, description="backbones: a timm name or a mapping; the second axis")
    strategies: list[StrategyConfig] = Field(min_length=1, description="strategies: a name or {name: ..., param: value}; the third axis")
    heads: list[Literal["softmax", "svm"]] = Field(["softmax"], min_length=1, description="softmax = the trained classifier; svm = linear SVM on the tuned network's features")
    folds: int = Field(5, ge=2, le=20, description="k of the outer stratified (patient-grouped) k-fold")
    seeds: list[int] = Field([0], min_length=1, description="repeat the whole CV with these seeds (folds and initialisation)")
    train: TrainConfig = Field(TrainConfig(), description="training settings shared by every cell")
    store: str = Field("results/medtune.sqlite", description="SQLite results store (`--store` overrides)")
    device: str = Field("auto", description="auto (CUDA if available), cpu, cuda or cuda:N")
    executor: Literal["local", "ray"] = "local"
    ray_address: str | None = None
    gpus_per_cell: float = Field(0, ge=0)
    cpus_per_cell: float = Field(1, gt=0)
    max_retries: int = Field(2, ge=0)
    primary: str | None = Field(None, description="the strategy (its label, e.g. partial_ft(blocks=2), or name) declared "
                                "before the run as the one to headline; default: auto_depth's nested choice if the "
                                "grid has it, else the report says its best row is an optimistic view")
    operating_points: list[dict[Literal["sensitivity", "specificity"], float]] = Field(
        default_factory=list, description="thresholds chosen on each outer fold's inner validation split, e.g. "
        "[{sensitivity: 0.95}, {specificity: 0.90}]; the report gives the outer folds' sensitivity, specificity, "
        "PPV and NPV at each (binary, or the data set's positive class)")
    test_datasets: list[DatasetConfig] = Field(default_factory=list, description="external test sets: each outer "
                                               "fold's model predicts them without refitting (same classes)")
    cv: Literal["kfold", "by_site"] = Field("kfold", description="kfold = stratified (patient-grouped) k-fold; "
                                            "by_site = leave one site out (a manifest `site` column)")
    subgroups: list[str] = Field(default_factory=list, description="manifest columns (sex, age_band, device, site) "
                                 "to report metrics per value of, with CIs")
    keep_best: bool = Field(True, description="after the grid, save the best cell group's fold-0 model (weights, "
                                                "preprocessing, SVM head) to <store>.models/best/ for predict/export")

    @field_validator("backbones", mode="before")
    @classmethod
    def _backbone_names(cls, v: Any) -> Any:
        return [{"name": b} if isinstance(b, str) else b for b in v] if isinstance(v, list) else v

    @field_validator("strategies", mode="before")
    @classmethod
    def _strategy_specs(cls, v: Any) -> Any:
        """`full_ft` or `{name: partial_ft, blocks: 2}` -> {name, params}."""
        if not isinstance(v, list):
            return v
        out = []
        for s in v:
            if isinstance(s, str):
                out.append({"name": s})
            elif isinstance(s, dict) and "params" not in s:
                out.append({"name": s.get("name"), "params": {k: x for k, x in s.items() if k != "name"}})
            else:
                out.append(s)
        return out

    @field_validator("operating_points")
    @classmethod
    def _operating_points(cls, v: list) -> list:
        for point in v:
            if len(point) != 1:
                raise ValueError(f"each operating point names one target, e.g. {{sensitivity: 0.95}}; got {point}")
            (target, value), = point.items()
            if not 0 < value <= 1:
                raise ValueError(f"operating point {target}: {value} must be in (0, 1], e.g. 0.95")
        return v

    @field_validator("seeds", "heads")
    @classmethod
    def _no_repeats(cls, v: list) -> list:
        if len(set(v)) != len(v):
            raise ValueError(f"{v} repeats an entry; each must appear once")
        if any(isinstance(x, int) and not 0 <= x < 2**32 for x in v):  # numpy's seeds
            raise ValueError(f"{v}: seeds must be integers from 0 to 2**32 - 1")
        return v

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        if v not in ("auto", "cpu", "cuda") and not (v.startswith("cuda:") and v[5:].isdigit()):
            raise ValueError("device must be auto, cpu, cuda or cuda:N")
        return v


def _format_error(exc: ValidationError, source: str) -> str:
    lines = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"])
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            key = str(err["loc"][-1])
            model = _model_at(err["loc"][:-1])
            close = difflib.get_close_matches(key, list(model.model_fields), n=1) if model else []
            msg = f"unknown key{f' (did you mean {close[0]!r}?)' if close else ''}"
            if model:
                msg += f"; allowed here: {', '.join(model.model_fields)}"
        lines.append(f"  {loc or '(top level)'}: {msg}")
    return f"{source}: invalid configuration:\n" + "\n".join(lines)


def _model_at(loc: tuple) -> type[BaseModel] | None:
    model: type[BaseModel] = ExperimentConfig
    for part in loc:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(str(part))
        if field is None:
            return None
        ann = field.annotation
        inner = getattr(ann, "__args__", (ann,))
        nxt = next((a for a in inner if isinstance(a, type) and issubclass(a, BaseModel)), None)
        if nxt is None:
            return None
        model = nxt
    return model


def parse_override(raw: dict, assignment: str) -> dict:
    """Apply `a.b.0.c=value` (value parsed as YAML) to the raw config; unknown paths are errors
    at validation time, list indices out of range are errors here."""
    if "=" not in assignment:
        raise ConfigError(f"--set {assignment!r}: expected KEY.PATH=VALUE, e.g. train.epochs=3")
    path, value = assignment.split("=", 1)
    keys = path.strip().split(".")
    try:
        parsed = yaml.safe_load(value) if value.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"--set {assignment!r}: the value is not valid YAML ({exc})") from exc
    node: Any = raw
    for i, key in enumerate(keys[:-1]):
        if isinstance(node, list):
            if not key.isdigit() or int(key) >= len(node):
                raise ConfigError(f"--set {path}: {'.'.join(keys[:i])} has {len(node)} entries; {key!r} is not an index")
            node = node[int(key)]
        else:
            if not isinstance(node, dict):
                raise ConfigError(f"--set {path}: {'.'.join(keys[:i])} is a value, not a section")
            node = node.setdefault(key, {})
    last = keys[-1]
    if isinstance(node, list):
        if not last.isdigit() or int(last) >= len(node):
            raise ConfigError(f"--set {path}: index {last!r} is out of range")
        node[int(last)] = parsed
    elif isinstance(node, dict):
        node[last] = parsed
    else:
        raise ConfigError(f"--set {path}: {'.'.join(keys[:-1])} is a value, not a section")
    return raw


def normalise_raw(raw: dict) -> dict:
    """Short forms to long ones before overrides, so `--set strategies.1.blocks=3` and
    `--set backbones.0.name=resnet50` work on `- partial_ft` / `- efficientnet_lite0` entries."""
    raw = dict(raw)
    if isinstance(raw.get("backbones"), list):
        raw["backbones"] = [{"name": b} if isinstance(b, str) else b for b in raw["backbones"]]
    if isinstance(raw.get("strategies"), list):
        raw["strategies"] = [{"name": s} if isinstance(s, str) else s for s in raw["strategies"]]
    return raw


def load_config(path: str | Path | None = None, overrides: list[str] | None = None, raw: dict | None = None) -> ExperimentConfig:
    source = str(path) if path else "config"
    if raw is None:
        p = Path(path)  # type: ignore[arg-type]
        if not p.is_file():
            raise ConfigError(f"config file {p} does not exist.")
        try:
            raw = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{p}: not valid YAML ({exc}).") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of keys (datasets, backbones, strategies, ...).")
    raw = normalise_raw(raw)
    for o in overrides or []:
        raw = parse_override(raw, o)
    try:
        cfg = ExperimentConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_format_error(exc, source)) from None
    _check_names(cfg, source)
    return cfg


def _check_names(cfg: ExperimentConfig, source: str) -> None:
    """Strategy and backbone names are checked here, before any data is loaded."""
    from medtune.backbones import check_name
    from medtune.strategies import create_strategy

    for s in cfg.strategies:
        combos = expand_params(s.params)
        if not combos:
            empty = [k for k, v in s.params.items() if v == []]
            raise ConfigError(f"{source}: strategy {s.name!r}: `{empty[0]}: []` sweeps no values; give at least one "
                              f"(e.g. `{empty[0]}: [1]`) or drop the key.")
        for params in combos:
            create_strategy(s.name, **params)
    for b in cfg.backbones:
        check_name(b.name)
        if b.image_size is not None:
            _check_fixed_input_size(b.name, b.image_size, source)
    names = [d.display_name() for d in cfg.datasets + cfg.test_datasets]
    if len(set(names)) != len(names):
        raise ConfigError(f"{source}: data set names must be unique; got {names}. Give each a `name`.")


def _check_fixed_input_size(name: str, image_size: int, source: str) -> None:
    """Vision transformers built with a fixed patch grid (timm's default for ViT, DeiT, BEiT, ...) take one
    input size only; any other `image_size` would fail inside the first cell with timm's assertion. The
    architecture is built on the meta device (no memory, no weights) to read its patch embedding."""
    import torch

    from medtune.backbones import create_architecture, timm_name

    try:  # as create_backbone builds it: timm's ViTs with a patch grid that follows the input
        with torch.device("meta"):
            model = create_architecture(timm_name(name), pretrained=False)
    except Exception:  # noqa: BLE001 - not buildable this way (e.g. embedded weights): the cell will say
        return
    embed = getattr(model, "patch_embed", None)
    fixed = getattr(embed, "img_size", None)
    if fixed and getattr(embed, "strict_img_size", False) and not getattr(model, "dynamic_img_size", False) \
            and tuple(fixed) != (image_size, image_size):
        raise ConfigError(f"{source}: backbone {name!r} takes {fixed[0]}x{fixed[1]} images only (a fixed grid of "
                          f"patches), not image_size {image_size}. Set `image_size: {fixed[0]}` or leave it out.")


def expand_params(params: dict[str, Any]) -> list[dict[str, Any]]:
    """{blocks: [1, 2], decay: 0.5} -> [{blocks: 1, decay: 0.5}, {blocks: 2, decay: 0.5}].
    `candidates` (auto_depth) is a list by nature and never swept."""
    import itertools

    keys = [k for k, v in params.items() if isinstance(v, list) and k != "candidates"]
    if not keys:
        return [dict(params)]
    combos = itertools.product(*(params[k] for k in keys))
    return [{**params, **dict(zip(keys, c))} for c in combos]
