"""The presets ship inside the wheel, so a non-editable install finds them.

`pyproject.toml` builds with `presets/_build.py`'s `build_py`, which copies
each preset folder into the built package as `keras_vmoe/presets/<name>/`;
`presets_dir()` looks there first (before the source checkout).
"""

import importlib.util
import pathlib

from keras_vmoe.models import from_preset, list_presets, preset_loader
from keras_vmoe.models.vision_moe import presets

ROOT = pathlib.Path(__file__).resolve().parents[2]
TINY_OVERRIDES = dict(
    image_size=16, patch_size=4, num_layers=2, hidden_dim=16, mlp_dim=32, num_heads=2
)


def _build_hook():
    spec = importlib.util.spec_from_file_location(
        "presets_build", ROOT / "presets" / "_build.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_pyproject_uses_the_build_hook():
    text = (ROOT / "pyproject.toml").read_text()
    assert 'build_py = "presets._build.BuildPyWithPresets"' in text
    # The source distribution carries the hook and the preset files.
    manifest = (ROOT / "MANIFEST.in").read_text().split()
    assert manifest[:2] == ["recursive-include", "presets"]
    assert {"*.json", "*.py"} <= set(manifest[2:])


def _run_build_hook(build_lib, monkeypatch):
    """Runs the hook's preset copy into `build_lib`; returns the copy."""
    hook = _build_hook()
    # Only the preset copy: the package's own files are setuptools' job.
    monkeypatch.setattr(hook.build_py, "run", lambda self: None)
    command = hook.BuildPyWithPresets.__new__(hook.BuildPyWithPresets)
    command.build_lib = str(build_lib)
    command.run()
    return build_lib / "keras_vmoe" / "presets"


def test_build_hook_copies_every_preset(tmp_path, monkeypatch):
    installed = _run_build_hook(tmp_path, monkeypatch)
    names = sorted(p.name for p in installed.iterdir())
    assert names == sorted(presets.preset_definitions()) and len(names) == 37
    for name in names:
        source = presets.presets_dir() / name
        files = sorted(p.name for p in (installed / name).iterdir())
        assert files == [
            "config.json",
            "image_converter.json",
            "metadata.json",
            "preprocessor.json",
            "task.json",
        ]
        for filename in files:
            assert (installed / name / filename).read_bytes() == (
                source / filename
            ).read_bytes()


def test_installed_package_data_is_found_first(tmp_path, monkeypatch):
    """Laid out as a wheel installs it, the package's own copy is used."""
    site = tmp_path / "site-packages"
    module_file = site / "keras_vmoe" / "models" / "preset_loader.py"
    installed = site / "keras_vmoe" / "presets"
    (installed / "only_here").mkdir(parents=True)
    (installed / "only_here" / "config.json").write_text("{}")
    monkeypatch.delenv(preset_loader.PRESETS_ENV_VAR, raising=False)
    monkeypatch.setattr(preset_loader, "__file__", str(module_file))
    assert preset_loader.presets_dir() == installed
    assert preset_loader.builtin_names() == ["only_here"]
    # The environment variable still wins.
    monkeypatch.setenv(preset_loader.PRESETS_ENV_VAR, str(ROOT / "presets"))
    assert preset_loader.presets_dir() == ROOT / "presets"
    assert len(list_presets()) == 37


def test_models_load_from_the_installed_copy(tmp_path, monkeypatch):
    installed = _run_build_hook(tmp_path, monkeypatch)
    monkeypatch.delenv(preset_loader.PRESETS_ENV_VAR, raising=False)
    monkeypatch.setattr(
        preset_loader, "__file__", str(installed.parent / "models" / "x.py")
    )
    assert preset_loader.presets_dir() == installed
    model = from_preset(
        "soft_moe_b16_e128_224", num_classes=2, num_experts=4, **TINY_OVERRIDES
    )
    backbone = model.backbone
    assert backbone.router == "soft" and backbone.pooling == "gap"
    assert backbone.moe_layer_indices == (0, 1)  # "last:6" of 2 blocks
