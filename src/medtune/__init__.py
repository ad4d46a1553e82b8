"""medtune: how deeply, and how, should I fine-tune a pretrained network on my medical images?

Public API (mirrors the CLI): `load_dataset`, `create_backbone`, `create_strategy`,
`list_backbones`, `list_strategies`, `load_config`, `run`, `results`.
"""

from medtune.version import __version__  # noqa: E402 - one place, importable without the package

from medtune.models.backbones import STUDY_BACKBONES, create_backbone  # noqa: E402
from medtune.config import load_config  # noqa: E402
from medtune.data.loaders import load_dataset  # noqa: E402
from medtune.training.strategies import create_strategy, list_strategies  # noqa: E402


def list_backbones() -> list[str]:
    """The studies' backbones (any timm model name works too)."""
    return list(STUDY_BACKBONES)


def run(config, store: str | None = None, overrides: list[str] | None = None, progress: bool = True):
    """Run (or resume) a grid from a YAML path, a dict or an `ExperimentConfig`; returns a RunSummary."""
    from pathlib import Path

    from medtune.config import ExperimentConfig
    from medtune.grid.runner import run as _run

    if isinstance(config, (str, Path)):
        config = load_config(config, overrides)
    elif isinstance(config, dict):
        config = load_config(raw=config, overrides=overrides)
    elif not isinstance(config, ExperimentConfig):
        raise TypeError("config must be a YAML path, a dict or an ExperimentConfig")
    return _run(config, store, progress=progress)


def results(store: str):
    """Per-cell metrics from a results store as a pandas DataFrame."""
    from medtune.evaluation.store import open_store

    with open_store(store, must_exist=True) as s:
        return s.metrics()


__all__ = ["load_dataset", "create_backbone", "create_strategy", "list_backbones", "list_strategies",
           "load_config", "run", "results", "__version__"]
