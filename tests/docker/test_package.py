"""What the Docker image installs: a wheel of the sources (`pip install /src`, not editable) must
carry every file the service reads at run time, and work from it with no checkout beside it."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
# What docker/Dockerfile copies into /src before `pip install --no-deps /src`.
SOURCES = ("pyproject.toml", "README.md", "models", "indexer", "app")
RUNTIME_DATA = ("models/default", "models/configs", "app/static")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    work = tmp_path_factory.mktemp("package")
    src = work / "src"
    src.mkdir()
    for name in SOURCES:  # a copy, so the build leaves nothing in the checkout
        source = ROOT / name
        if source.is_dir():
            shutil.copytree(source, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(source, src / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                    "--wheel-dir", str(work / "dist"), str(src)], check=True, capture_output=True)
    (built,) = (work / "dist").glob("clipsearch-*.whl")
    return built


def test_the_wheel_carries_every_runtime_file(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = {str(path.relative_to(ROOT)) for folder in RUNTIME_DATA for path in (ROOT / folder).rglob("*")
                if path.is_file() and "__pycache__" not in path.parts}
    assert {"models/default/trained/parts.safetensors", "app/static/index.html"} <= expected
    assert expected - names == set()


def test_the_installed_package_embeds_with_the_default_model(wheel: Path, tmp_path: Path) -> None:
    """Unpacked and first on the path, the wheel (not the checkout) answers `load_encoder()`."""
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    script = (
        "import models, app.main; from pathlib import Path; from PIL import Image;"
        f"assert Path(models.__file__).is_relative_to({str(site)!r}), models.__file__;"
        "assert (app.main.STATIC / 'index.html').is_file();"
        "enc = models.load_encoder();"
        "print(enc.encode_texts(['a bird']).shape, enc.encode_images([Image.new('RGB', (64, 64), 'red')]).shape)"
    )
    run = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True,
                         env={"PYTHONPATH": str(site), "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.split() == ["(1,", "384)", "(1,", "384)"]
