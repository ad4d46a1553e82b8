"""The notebook API: medtune.run(dict | path | ExperimentConfig) and medtune.results(store)."""

import pandas as pd
import pytest
import yaml

import medtune
from medtune.errors import ConfigError, MedtuneError

SMALL = {
    "name": "api",
    "datasets": [{"name": "syn", "source": "synthetic", "options": {"n_patients": 8, "images_per_patient": 2}}],
    "backbones": [{"name": "test_efficientnet", "pretrained": False, "image_size": 32}],
    "strategies": ["linear_probe", {"name": "partial_ft", "blocks": 1}],
    "folds": 2,
    "train": {"epochs": 1, "batch_size": 8, "views": 1, "patience": 1},
}


def test_run_dict_then_results_dataframe_then_resume(tmp_path):
    store = tmp_path / "api.sqlite"
    summary = medtune.run({**SMALL, "store": str(store)}, progress=False)
    assert (summary.total, summary.done, summary.failed, summary.skipped) == (4, 4, 0, 0)
    df = medtune.results(store)
    assert isinstance(df, pd.DataFrame) and len(df) == 4
    assert set(df.strategy) == {"linear_probe", "partial_ft(blocks=1)"}
    assert sorted(df.fold.unique()) == [0, 1] and set(df.dataset) == {"syn"}
    assert df["balanced_accuracy"].between(0, 1).all()
    again = medtune.run({**SMALL, "store": str(store)}, progress=False)
    assert (again.done, again.skipped) == (0, 4)  # every cell already in the store


def test_run_yaml_path_with_overrides_and_store_argument(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump({**SMALL, "strategies": [{"name": "partial_ft", "blocks": 1}],
                                    "store": str(tmp_path / "ignored.sqlite")}))
    store = tmp_path / "chosen.sqlite"
    summary = medtune.run(path, store=str(store), overrides=["strategies.0.blocks=2"], progress=False)
    assert summary.store == str(store) and not (tmp_path / "ignored.sqlite").exists()
    assert set(medtune.results(store).strategy) == {"partial_ft(blocks=2)"}


def test_api_errors_are_clear():
    with pytest.raises(ConfigError, match="folds"):
        medtune.run({**SMALL, "folds": 1}, progress=False)
    with pytest.raises(TypeError, match="YAML path, a dict or an ExperimentConfig"):
        medtune.run(42)
    with pytest.raises(MedtuneError, match="no results store"):
        medtune.results("/nonexistent/dir/x.sqlite")


def test_public_names():
    assert {"run", "results", "load_dataset", "create_strategy", "create_backbone", "list_strategies",
            "list_backbones", "load_config"} <= set(medtune.__all__)
    assert medtune.create_strategy("partial_ft", blocks=2).label() == "partial_ft(blocks=2)"
    table = medtune.load_dataset(source="synthetic", image_size=32, n_patients=6, images_per_patient=1)
    assert table.images.shape[1:] == (3, 32, 32) and table.groups is not None
    # Bad loader options are user errors naming the option, not tracebacks.
    with pytest.raises(MedtuneError, match="n_patients must be at least 6"):
        medtune.load_dataset(source="synthetic", image_size=32, n_patients=4)
    with pytest.raises(MedtuneError, match="fram"):
        medtune.load_dataset(source="synthetic", image_size=32, fram=2)


def test_the_api_function_and_the_stage_packages_do_not_shadow_each_other():
    """`medtune.results(store)` is the notebook API; no stage sub-package may carry a public function's
    name, or `import medtune.<pkg>.<module> as m` and `medtune.<pkg>.<module>` break (a sub-package of that
    name had replaced, or been replaced by, the function, depending on import order)."""
    import importlib
    import pkgutil

    import medtune

    for info in pkgutil.iter_modules(medtune.__path__):
        if info.ispkg:
            assert info.name not in medtune.__all__, info.name
            module = importlib.import_module(f"medtune.{info.name}")
            assert getattr(medtune, info.name) is module
    assert callable(medtune.results)
