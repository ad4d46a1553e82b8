"""The experiment file: one YAML -> validated pydantic models, with errors that name the key.

Unknown keys are errors (a typo must not silently fall back to a default). `--set a.b=value`
overrides are applied to the raw YAML before validation, so they get the same checks.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_serializer, model_validator

from medtune.errors import ConfigError
from medtune.evaluation.metrics import RACEABLE_METRICS


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
    pretrained: bool = Field(True, description="false = random init, asked for knowingly; true never falls back "
                                               "silently")
    checkpoint: str | None = Field(None, description="local .pth/.pt/.bin/.safetensors state dict to start from")
    image_size: int | None = Field(None, ge=16, le=1024, description="default: the weights' own input size")
    weights: str | None = Field(None, description="named pretrained weights: a registry key (`medtune list weights`, "
                                                  "e.g. radimagenet) or a timm tag of this architecture")
    sha256: str | None = Field(None, pattern=r"^[0-9a-fA-F]{64}$",
                               description="expected sha256 of `checkpoint` (or of the named file); a mismatch is "
                                           "refused")

    @field_validator("sha256", mode="before")
    @classmethod
    def _sha256_is_text(cls, v: Any) -> Any:
        """A hash of only digits is read by YAML as a number (leading zeros lost, or octal): refuse it."""
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            raise ValueError("the sha256 was read as a number (YAML reads a hash of only digits so, dropping leading "
                             "zeros); quote it: sha256: '0123...'")
        return v

    @model_serializer(mode="wrap")
    def _drop_unset_weight_keys(self, handler):
        """`weights`/`sha256` are left out while unset, so cell ids of grids that do not use them stay as
        they were (a resumed store keeps reusing its cells)."""
        out = handler(self)
        for key in ("weights", "sha256"):
            if out.get(key) is None:
                out.pop(key, None)
        return out


class Choose(Strict):
    """`{choose: [a, b, c]}`: one value picked per outer fold on its inner validation split (grid/select.py),
    unlike a list, which is a grid axis (one cell per value)."""

    choose: list[float | int | str] = Field(min_length=1, description="the values to choose among on inner splits")


def is_choice(value: Any) -> bool:
    """A `{choose: [...]}` value (raw or validated)."""
    return isinstance(value, Choose) or (isinstance(value, dict) and set(value) == {"choose"})


def strategy_entry(s: Any) -> Any:
    """`full_ft` or `{name: partial_ft, blocks: 2, lr: ...}` -> {name, params[, lr]}."""
    if isinstance(s, str):
        return {"name": s}
    if isinstance(s, dict) and "params" not in s:
        entry = {"name": s.get("name"), "params": {k: x for k, x in s.items() if k not in ("name", "lr")}}
        return {**entry, "lr": s["lr"]} if "lr" in s else entry
    return s


class StrategyConfig(Strict):
    """A strategy and its hyperparameters; a list value sweeps (`blocks: [1, 2, 3]`), a `{choose: [...]}` value
    is chosen on the inner split of each outer fold."""

    name: str = Field(description="registry key (`medtune list strategies`, docs/strategies.md)")
    params: dict[str, Any] = Field(default_factory=dict, description="hyperparameters; a list value sweeps, "
                                   "{choose: [...]} chooses on inner splits")
    lr: float | Choose | list[float] | None = Field(None, description="this strategy's base learning rate "
                                                    "(default: train.lr); a list sweeps, {choose: [...]} chooses")

    @field_validator("params")
    @classmethod
    def _choices(cls, v: dict[str, Any]) -> dict[str, Any]:
        for key, value in v.items():
            if isinstance(value, dict) and not is_choice(value):
                raise ValueError(f"{key}: a mapping here must be {{choose: [v1, v2, ...]}} (values chosen on the "
                                 f"inner split), got {value!r}")
            if is_choice(value) and (not isinstance(value["choose"], list) or not value["choose"]):
                raise ValueError(f"{key}: `choose` needs a non-empty list of values, got {value['choose']!r}")
        return v

    @field_validator("lr")
    @classmethod
    def _positive_lr(cls, v: Any) -> Any:
        values = v.choose if isinstance(v, Choose) else v if isinstance(v, list) else [] if v is None else [v]
        if any(not isinstance(x, (int, float)) or x <= 0 for x in values):
            raise ValueError(f"learning rates must be numbers > 0, got {values}")
        return v


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
    lr: float | Choose = Field(1e-3, description="base learning rate (strategies scale it per block); "
                               "{choose: [1e-4, 3e-4, 1e-3]} picks it per outer fold on the inner validation split")
    weight_decay: float = Field(1e-4, ge=0, description="AdamW weight decay")
    warmup_epochs: float = Field(1.0, ge=0, description="linear warm-up before the cosine decay")
    patience: int = Field(5, ge=1, description="early stopping: epochs without improvement on the inner validation "
                                               "split")
    val_fraction: float = Field(0.15, ge=0, lt=0.5, description="share of each training fold held out (by patient) "
                                                                "for early stopping")
    class_weight: Literal["balanced", "none"] = Field(
        "balanced", description="balanced = every head weights its loss by inverse class frequency (softmax: "
        "cross-entropy, SVM: class_weight) and predicts the argmax under equal class priors; none = unweighted, "
        "argmax under the training fold's class frequencies")
    views: int = Field(
        4, ge=1, description="a training image is shown plain with probability 1/views, else augmented; "
        "the frozen-prefix cache holds the plain view and views-1 fixed augmented ones (1 = no augmentation)")
    cache: bool = Field(
        True, description="cache the output of frozen leading blocks, much faster: the same predictions "
        "as false at views 1; with more views the frozen part sees views-1 fixed augmentations of each "
        "image instead of fresh ones")
    amp: Literal["auto", "on", "off"] = Field(
        "auto", description="mixed precision: auto = bf16 on CUDA and bf16-capable CPUs, "
        "with strided or wide depthwise convolutions kept in fp32 on a CPU "
        "(measured faster there); on = bf16 everywhere. The cell id holds the resolved precision, so a store "
        "computed in fp32 is not reused on a bf16 machine; `ONEDNN_MAX_CPU_ISA=AVX512_CORE` (oneDNN's own cap) "
        "makes `auto` resolve to fp32 there and resumes it")
    channels_last: bool = Field(True, description="channels-last memory layout (faster convolutions on GPU)")
    compile: Literal["auto", "on", "off"] = Field(
        "auto", description="torch.compile (inductor) the trained part of the network: auto = where it was "
        "measured to win including compile time (nowhere yet: slower on a 2-core bf16 CPU, "
        "benchmarks/results/compile.json; unmeasured on CUDA); on = always. It changes numbers by rounding only, "
        "so it is not part of a cell's key; what applied is recorded per epoch")
    bn_statistics: Literal["update", "keep", "update_all"] = Field(
        "update", description="BatchNorm while training: update = a trained block's BatchNorm normalises with "
        "batch statistics (PyTorch's default), frozen blocks keep their pretrained ones; keep = every BatchNorm "
        "keeps its running statistics (eval mode; scale and shift still train), the Keras fine-tuning recipe, "
        "which pairs with lower learning rates (docs/strategies.md); update_all = frozen blocks update too "
        "(turns the feature cache off)")
    grad_clip: float = Field(5.0, ge=0, description="clip the gradient norm to this value; 0 = off")
    augment: AugmentConfig = Field(AugmentConfig(), description="training-time augmentation")

    @model_validator(mode="before")
    @classmethod
    def _old_imbalance_keys(cls, v: Any) -> Any:
        """`class_weighted` / `balanced_sampler` were replaced by `class_weight` (one rule for both heads)."""
        if isinstance(v, dict):
            for old in ("class_weighted", "balanced_sampler"):
                if old in v:
                    raise ValueError(f"train.{old} was replaced by train.class_weight: balanced (the default: "
                                     "class-weighted loss for the softmax head, class-weighted SVM, both predicting "
                                     "under equal class priors) or none; remove train.{old}")
        return v

    @field_validator("lr")
    @classmethod
    def _positive_lr(cls, v: Any) -> Any:
        values = v.choose if isinstance(v, Choose) else [v]
        if any(not isinstance(x, (int, float)) or isinstance(x, bool) or x <= 0 for x in values):
            raise ValueError(f"learning rates must be numbers > 0, got {values}")
        return v

    @field_validator("amp", "compile", mode="before")
    @classmethod
    def _yaml_bool(cls, v: Any) -> Any:
        """YAML reads `amp: off` as False and `amp: on` as True."""
        return {False: "off", True: "on"}.get(v, v) if isinstance(v, bool) else v


class RacingConfig(Strict):
    """`racing: on` (these defaults) or a mapping of them: stop candidates that the inner validation
    splits show to be worse than the leader (grid/racing.py says how)."""
    confidence: float = Field(0.95, gt=0.5, lt=1, description="confidence that a pruned candidate is worse than the "
                              "leader by more than `margin`, over the whole race")
    min_folds: int = Field(2, ge=2, description="rounds (seed, fold) every candidate runs before any is pruned")
    margin: float = Field(0.01, ge=0, le=1, description="a candidate is pruned only when worse by more than this: "
                          "a near-tie is never pruned")
    metric: Literal[RACEABLE_METRICS] = Field(  # the metric table's raceable rows (evaluation/metrics.py)
        "balanced_accuracy", description="the inner-validation score the race compares")

    @field_validator("metric", mode="before")
    @classmethod
    def _raceable(cls, v: Any) -> Any:
        """Names the value and the choices; the table says which metrics racing may compare."""
        if v not in RACEABLE_METRICS:
            raise ValueError(f"{v!r} is not a metric racing can compare; choose one of: "
                             f"{', '.join(RACEABLE_METRICS)}")
        return v


class ExperimentConfig(Strict):
    name: str = Field("experiment", description="name of the experiment, saved with each run")
    # Every axis needs at least one entry: an empty one would make a grid of 0 cells that "succeeds".
    datasets: list[DatasetConfig] = Field(min_length=1, description="data sets; the grid's first axis")
    backbones: list[BackboneConfig] = Field(min_length=1, description="backbones: a timm name or a mapping; the "
                                                                      "second axis")
    strategies: list[StrategyConfig] = Field(min_length=1, description="strategies: a name or {name: ..., param: "
                                                                       "value}; the third axis")
    heads: list[str] = Field(["softmax"], min_length=1, description="registered heads (`medtune list heads`): "
                             "softmax = the trained classifier; svm = linear SVM on the tuned network's features; "
                             "knn = k-nearest-neighbour vote on them (cosine, k chosen on the inner split; the "
                             "MedMNIST+ protocol)")
    folds: int = Field(5, ge=2, le=20, description="k of the outer stratified (patient-grouped) k-fold")
    seeds: list[int] = Field([0], min_length=1, description="repeat the whole CV with these seeds (folds and "
                                                            "initialisation)")
    train_sizes: list[float | int] = Field([1.0], min_length=1, description="learning curves: run every cell at "
                                           "these sizes of its outer training fold, a fraction of the fold's "
                                           "training patients (0.25) or a number of them (40); nested, stratified, "
                                           "patient-intact subsets beside the same test fold; 1.0 (the whole fold, "
                                           "where the verdict is made) must be among them")
    train: TrainConfig = Field(TrainConfig(), description="training settings shared by every cell")
    store: str = Field("results/medtune.sqlite", description="SQLite results store (`--store` overrides)")
    device: str = Field("auto", description="auto (CUDA if available), cpu, cuda or cuda:N")
    executor: Literal["local", "ray"] = "local"
    ray_address: str | None = None
    gpus_per_cell: float = Field(0, ge=0)
    cpus_per_cell: float = Field(1, gt=0)
    max_retries: int = Field(2, ge=0)
    primary: str | None = Field(None, description="the strategy (its label, e.g. partial_ft(blocks=2), or name) "
                                                  "declared "
                                "before the run as the one to headline; default: auto_depth's nested choice if the "
                                "grid has it, else the best mean score on the cells' inner validation splits")
    recommend: Literal["leader", "one_se"] = Field("leader", description="the rule, fixed before the run, for the "
                                                   "recommended (and deployed) configuration when no `primary` or "
                                                   "auto_depth decides: leader = the best mean inner-validation score; "
                                                   "one_se = the fewest trained parameters within one standard error "
                                                   "(over folds) of that leader")
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
    racing: RacingConfig | None = Field(None, description="race the candidates fold by fold and stop the ones the "
                                        "inner validation splits show cannot win (`racing: on`, or a mapping of "
                                        "confidence, min_folds, margin, metric); off by default")
    halving: bool = Field(False, description="successive halving of each `{choose: [...]}` on the inner split: every "
                          "candidate trains the first third of its schedule at its own rate (LP-FT's probe, the same "
                          "for every rate, does not count), the best third continues (eta 3), so a 3-value choice "
                          "costs about 1.7 full fits instead of 3; the survivor is trained exactly as alone")
    keep_best: bool = Field(True, description="after the grid, save the deployable model of the best cell group "
                                                "(weights, preprocessing, feature head, MODEL_CARD.md) to "
                                                "<store>.models/best/ for predict/export")
    tracking: Literal["none", "mlflow"] = Field("none", description="mlflow = log each cell to MLflow as it "
                                                "finishes (pip install 'medtune[tracking]'); the store stays the "
                                                "source")
    tracking_uri: str | None = Field(None, description="MLflow tracking URI; default sqlite:///mlflow.db in the "
                                                       "current folder (artifacts in ./mlruns), offline")

    @field_validator("backbones", mode="before")
    @classmethod
    def _backbone_names(cls, v: Any) -> Any:
        return [{"name": b} if isinstance(b, str) else b for b in v] if isinstance(v, list) else v

    @field_validator("strategies", mode="before")
    @classmethod
    def _strategy_specs(cls, v: Any) -> Any:
        """`full_ft` or `{name: partial_ft, blocks: 2}` -> {name, params}."""
        return [strategy_entry(s) for s in v] if isinstance(v, list) else v

    @model_validator(mode="after")
    def _racing_needs_inner_split(self) -> "ExperimentConfig":
        if self.racing is not None and self.train.val_fraction == 0:
            raise ValueError("racing compares candidates on their inner validation splits; train.val_fraction is 0. "
                             "Set train.val_fraction (e.g. 0.15) or turn racing off.")
        if self.racing is not None and self.racing.min_folds >= self.folds * len(self.seeds):
            raise ValueError(f"racing.min_folds ({self.racing.min_folds}) leaves no round to prune after "
                             f"({self.folds} folds x {len(self.seeds)} seed(s)); lower it or turn racing off.")
        return self

    @field_validator("train_sizes")
    @classmethod
    def _train_sizes(cls, v: list) -> list:
        from medtune.data.subsets import check_sizes

        try:
            return check_sizes(v)
        except ConfigError as exc:
            raise ValueError(str(exc)) from None

    @field_validator("racing", mode="before")
    @classmethod
    def _racing_switch(cls, v: Any) -> Any:
        """YAML's `racing: on` is True, `racing: off` False."""
        return {} if v is True or v == "on" else None if v is False or v == "off" else v

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

    @field_validator("heads")
    @classmethod
    def _registered_heads(cls, v: list[str]) -> list[str]:
        """Each name must be a registered head (heads.HEADS): the registry is the one list of them."""
        from medtune.models.heads import head_class

        for name in v:
            try:
                head_class(name)
            except ConfigError as exc:
                raise ValueError(str(exc)) from None
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


class UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key written twice in one mapping: PyYAML silently keeps the last
    value, so `epochs: 5` further down would quietly override `epochs: 50` above it."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: dict = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor` overrides by design
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    first = seen.get(key)
                except TypeError:  # an unhashable key: SafeLoader's own error says so
                    break
                if first is not None:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"key {key!r} appears twice in one mapping (first on line {first.line + 1}); "
                        "YAML would silently keep only the last value. Delete one of them", key_node.start_mark)
                seen[key] = key_node.start_mark
        return super().construct_mapping(node, deep=deep)


def load_yaml(text: str):
    return yaml.load(text, Loader=UniqueKeyLoader)


def parse_override(raw: dict, assignment: str) -> dict:
    """Apply `a.b.0.c=value` (value parsed as YAML) to the raw config; unknown paths are errors
    at validation time, list indices out of range are errors here."""
    if "=" not in assignment:
        raise ConfigError(f"--set {assignment!r}: expected KEY.PATH=VALUE, e.g. train.epochs=3")
    path, value = assignment.split("=", 1)
    keys = path.strip().split(".")
    try:
        parsed = load_yaml(value) if value.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"--set {assignment!r}: the value is not valid YAML ({exc})") from exc
    node: Any = raw
    for i, key in enumerate(keys[:-1]):
        if isinstance(node, list):
            if not key.isdigit() or int(key) >= len(node):
                raise ConfigError(f"--set {path}: {'.'.join(keys[:i])} has {len(node)} entries; {key!r} is not an "
                                  f"index")
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


def load_config(path: str | Path | None = None, overrides: list[str] | None = None,
                raw: dict | None = None) -> ExperimentConfig:
    source = str(path) if path else "config"
    if raw is None:
        p = Path(path)  # type: ignore[arg-type]
        if not p.is_file():
            raise ConfigError(f"config file {p} does not exist.")
        try:
            raw = load_yaml(p.read_text()) or {}
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
    """Strategy and backbone names are checked here, before any data is loaded: every value of
    every sweep and every `{choose: [...]}` must make a valid strategy."""
    from medtune.models.backbones import check_name
    from medtune.training.strategies import create_strategy

    lora_targets: set[str] = set()  # explicit LoRA targets, checked against every backbone below
    for s in cfg.strategies:
        if s.name == AUTO_DEPTH:
            for cand in auto_depth_candidates(s.params):
                for params in expand_params(cand.params):
                    for chosen in expand_choices(params):
                        st = create_strategy(cand.name, **chosen)
                        lora_targets |= {st.targets} if cand.name == "lora" else set()
            continue
        combos = expand_params(s.params)
        if not combos:
            empty = [k for k, v in s.params.items() if v == []]
            raise ConfigError(f"{source}: strategy {s.name!r}: `{empty[0]}: []` sweeps no values; give at least one "
                              f"(e.g. `{empty[0]}: [1]`) or drop the key.")
        for params in combos:
            for chosen in expand_choices(params):
                st = create_strategy(s.name, **chosen)
                lora_targets |= {st.targets} if s.name == "lora" else set()
    for b in cfg.backbones:
        check_name(b.name)
        if b.image_size is not None:
            _check_fixed_input_size(b.name, b.image_size, source)
        _check_lora_targets(b.name, sorted(lora_targets - {"auto"}), source)
    names = [d.display_name() for d in cfg.datasets + cfg.test_datasets]
    if len(set(names)) != len(names):
        raise ConfigError(f"{source}: data set names must be unique; got {names}. Give each a `name`.")
    _check_repeats(cfg, source)


def _check_repeats(cfg: ExperimentConfig, source: str) -> None:
    """The same strategy, backbone, head or seed listed twice would run (and average) the same cells
    twice: refused, naming the entry, whichever way it was written (`full_ft` or `{name: full_ft}`)."""
    import json

    for axis in ("strategies", "backbones", "heads", "seeds"):
        seen: dict[str, int] = {}
        for i, entry in enumerate(getattr(cfg, axis)):
            dumped = entry.model_dump() if isinstance(entry, BaseModel) else entry
            key = json.dumps(dumped, sort_keys=True, default=str)
            if key in seen:
                shown = dumped.get("name", dumped) if isinstance(dumped, dict) else dumped
                raise ConfigError(f"{source}: {axis} entries {seen[key]} and {i} are the same ({shown!r}, "
                                  f"{json.dumps(dumped, default=str)}): its cells would run twice. Delete one, or "
                                  "make them differ (e.g. another hyperparameter).")
            seen[key] = i


def _check_fixed_input_size(name: str, image_size: int, source: str) -> None:
    """Vision transformers built with a fixed patch grid (timm's default for ViT, DeiT, BEiT, ...) take one
    input size only; any other `image_size` would fail inside the first cell with timm's assertion. The
    architecture is built on the meta device (no memory, no weights) to read its patch embedding."""
    import torch

    from medtune.models.backbones import create_architecture, timm_name

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


def _check_lora_targets(name: str, targets: list[str], source: str) -> None:
    """`lora(targets=attention)` on a CNN finds no layer to adapt: said here, once, naming the
    backbone, rather than by each of its cells (the architecture is built on the meta device)."""
    if not targets:
        return
    import torch

    from medtune.models.adapters import lora_modules
    from medtune.models.backbones import create_architecture, timm_name

    try:
        with torch.device("meta"):
            model = create_architecture(timm_name(name), pretrained=False)
    except Exception:  # noqa: BLE001 - not buildable this way (e.g. embedded weights): the cell will say
        return
    for t in targets:
        try:
            lora_modules(model, t)
        except ConfigError as exc:
            raise ConfigError(f"{source}: backbone {name!r}: {exc}") from None


def expand_params(params: dict[str, Any]) -> list[dict[str, Any]]:
    """{blocks: [1, 2], decay: 0.5} -> [{blocks: 1, decay: 0.5}, {blocks: 2, decay: 0.5}]: a grid axis.
    `candidates` (auto_depth) is a list by nature and never swept; `{choose: [...]}` is no axis."""
    import itertools

    keys = [k for k, v in params.items() if isinstance(v, list) and k != "candidates"]
    if not keys:
        return [dict(params)]
    combos = itertools.product(*(params[k] for k in keys))
    return [{**params, **dict(zip(keys, c))} for c in combos]


def choice_values(value: Any) -> list | None:
    """The values of a `{choose: [...]}`, or None for a plain value."""
    if isinstance(value, Choose):
        return list(value.choose)
    return list(value["choose"]) if is_choice(value) else None


def expand_choices(params: dict[str, Any]) -> list[dict[str, Any]]:
    """{alpha: {choose: [0.01, 0.1]}, beta: 0} -> [{alpha: 0.01, beta: 0}, {alpha: 0.1, beta: 0}]: the
    candidates among which one cell chooses on its inner split (grid/select.py), not cells of the grid."""
    import itertools

    keys = [k for k, v in params.items() if is_choice(v)]
    combos = itertools.product(*(choice_values(params[k]) for k in keys))
    return [{**params, **dict(zip(keys, c))} for c in combos]


AUTO_DEPTH = "auto_depth"
AUTO_DEPTH_CANDIDATES = ("linear_probe", "partial_ft(blocks=1)", "partial_ft(blocks=2)", "full_ft")


def auto_depth_candidates(params: dict[str, Any]) -> list[StrategyConfig]:
    """auto_depth's `candidates` as strategy entries: labels (`partial_ft(blocks=2)`, the form tables
    print) or mappings like any strategy entry (`{name: full_ft, lr: {choose: [...]}}`)."""
    unknown = sorted(set(params) - {"candidates", "inner_folds"})
    if unknown:
        raise ConfigError(f"strategy 'auto_depth' has no parameter {', '.join(unknown)}; its parameters are "
                          "candidates (strategies to choose among) and inner_folds (>= 2)")
    folds = params.get("inner_folds", 3)
    if not isinstance(folds, int) or isinstance(folds, bool) or folds < 2:
        raise ConfigError(f"strategy 'auto_depth': inner_folds must be an integer >= 2, got {folds!r}")
    raw = params.get("candidates", list(AUTO_DEPTH_CANDIDATES))
    if not isinstance(raw, (list, tuple)) or not raw:
        raise ConfigError("strategy 'auto_depth': candidates must be a non-empty list of strategies, e.g. "
                          "[linear_probe, 'partial_ft(blocks=2)', {name: full_ft, lr: {choose: [1e-4, 3e-4]}}]")
    out = []
    for c in raw:
        if isinstance(c, str):
            c = label_to_entry(c)
        try:
            entry = StrategyConfig.model_validate(strategy_entry(c))
        except ValidationError as exc:
            raise ConfigError(_format_error(exc, f"auto_depth candidate {c!r}")) from None
        if entry.name == AUTO_DEPTH:
            raise ConfigError("strategy 'auto_depth': a candidate cannot itself be auto_depth")
        out.append(entry)
    return out


def label_to_entry(label: str) -> dict[str, Any]:
    """`partial_ft(blocks=2)` -> {name: partial_ft, blocks: 2}: a table label back to a strategy entry."""
    import ast

    label = label.strip()
    if "(" not in label:
        return {"name": label}
    name, args = label.split("(", 1)
    try:
        call = ast.parse(f"f({args}", mode="eval").body
        params = {kw.arg: ast.literal_eval(kw.value) for kw in call.keywords}
    except (SyntaxError, ValueError) as exc:
        raise ConfigError(f"strategy label {label!r} is not of the form name(key=value, ...): {exc}") from None
    return {"name": name.strip(), **{k: list(v) if isinstance(v, tuple) else v for k, v in params.items()}}
