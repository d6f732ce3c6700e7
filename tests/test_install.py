"""The package as a user installs it: the built wheel, with an empty home folder and no source tree in reach.

The README's first command once failed for every new user because a data file was read from a path the wheel did
not have, and a cache in the developers' home folders hid it. These tests build the wheel, check that every file
the code opens is inside it, and load the embedded model from the unpacked wheel in a fresh process.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from ablation_core.resources import PACKAGE_DIR, packaged_files

REPO = PACKAGE_DIR.parent


def _git_files(folder: Path) -> list[Path]:
    """The files a clone would hold (tracked, or new and not ignored), as they are in the working tree."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard", str(folder)],
                            cwd=REPO, capture_output=True, check=True)
    return [REPO / name for name in listed.stdout.decode().split("\0") if name and (REPO / name).exists()]


def fresh_environment(home: Path) -> dict[str, str]:
    """An environment whose home folder and caches are empty folders under ``home``."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "ABLATION_CACHE")}
    env.update(HOME=str(home), XDG_CACHE_HOME=str(home / ".cache"), ABLATION_CACHE=str(home / "ablation"),
               HF_HOME=str(home / "hf"), TORCH_HOME=str(home / "torch"), HF_HUB_OFFLINE="1", TMPDIR=str(home))
    return env


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """Built from a copy of what a clone holds: ``build/`` and ``*.egg-info`` left in the working tree by earlier
    builds would otherwise put files into the wheel that ``package-data`` forgot."""
    source, out = tmp_path_factory.mktemp("clone"), tmp_path_factory.mktemp("wheel")
    for path in _git_files(REPO):
        (source / path.relative_to(REPO)).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, source / path.relative_to(REPO))
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                            "-w", str(out), str(source)], capture_output=True, text=True)
    assert built.returncode == 0, built.stderr[-2000:]
    (path,) = out.glob("*.whl")
    return path


def test_every_file_the_code_opens_is_in_the_wheel(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    missing = [str(p.relative_to(REPO)) for p in packaged_files() if p.relative_to(REPO).as_posix() not in names]
    assert not missing, f"left out of package-data in pyproject.toml: {missing}"


def test_every_data_file_in_the_package_folder_ships(wheel):
    """A data file added under ablation_core/ and read by new code must not be forgotten in package-data."""
    names = set(zipfile.ZipFile(wheel).namelist())
    data = [p for p in _git_files(PACKAGE_DIR) if p.suffix != ".py"]
    assert data, "git lists no data files in the package"
    missing = [str(p.relative_to(REPO)) for p in data if p.relative_to(REPO).as_posix() not in names]
    assert not missing, f"left out of package-data in pyproject.toml: {missing}"


def test_the_unpacked_wheel_loads_the_toy_world_with_an_empty_home(wheel, tmp_path):
    site, home, cwd = tmp_path / "site", tmp_path / "home", tmp_path / "cwd"
    for folder in (home, cwd):
        folder.mkdir()
    zipfile.ZipFile(wheel).extractall(site)
    script = (
        "import ablation_core, torch\n"
        f"assert ablation_core.__file__.startswith({str(site)!r}), ablation_core.__file__\n"
        "from ablation_core.toy import load_toy_classifier, toy_world_info\n"
        "view = ablation_core.load_model('toy')\n"
        "with torch.no_grad():\n"
        "    context = view.encode(['a photo of grumpy cat']).context\n"
        "assert torch.isfinite(context).all()\n"
        "load_toy_classifier(); assert toy_world_info()['concepts']\n"
        "print('ok')\n"
    )
    env = fresh_environment(home)
    env["PYTHONPATH"] = str(site)
    ran = subprocess.run([sys.executable, "-c", script], cwd=cwd, env=env, capture_output=True, text=True,
                         timeout=300)
    assert ran.returncode == 0 and ran.stdout.strip() == "ok", ran.stderr[-3000:]
    assert not any(home.rglob("*")), f"the package wrote into the home folder: {sorted(home.rglob('*'))}"
