"""Build hook: ships `presets/*/*` inside the wheel as `keras_vmoe/presets/`.

Referenced from pyproject.toml (`[tool.setuptools.cmdclass]`); needs only
setuptools, so it runs in an isolated build environment.
"""

import pathlib
import shutil

from setuptools.command.build_py import build_py


class BuildPyWithPresets(build_py):
    """`build_py` that also copies the preset folders into the package."""

    def run(self):
        super().run()
        source = pathlib.Path(__file__).resolve().parent
        target = pathlib.Path(self.build_lib) / "keras_vmoe" / "presets"
        folders = sorted(
            p
            for p in source.iterdir()
            # Hidden folders are left by interrupted atomic saves, not presets.
            if not p.name.startswith(".") and (p / "config.json").is_file()
        )
        for folder in folders:
            destination = target / folder.name
            destination.mkdir(parents=True, exist_ok=True)
            for path in folder.iterdir():
                if path.is_file() and path.suffix in (".json", ".h5"):
                    shutil.copy2(path, destination / path.name)
