"""Installs that are not editable, done the way a user does them, in subprocesses: build a wheel
(and an sdist) from a copy of the repository, install it into a fresh virtualenv, and run the
installed console scripts from an unrelated directory.

The fresh virtualenvs get no dependencies of their own (torch, transformers, ... are several GB):
after ssltrain is installed, a .pth file appends the site-packages of the interpreter running these
tests as one plain path line. A plain line only adds that directory at the end of sys.path; it is
not site.addsitedir, which would also run that directory's own .pth files, and one of them
installs the import finder of the editable install of ssltrain: every module missing from the
installed ssltrain (a subpackage left out of the wheel) would then import from the repository,
hiding exactly the packaging gaps these tests are for. The .pth file is written after
`pip install`, so pip sees a virtualenv without any ssltrain and installs it as into an empty one.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import zipfile
from pathlib import Path

import pytest
from conftest import REPO

pytestmark = pytest.mark.slow

# A Python warning the build backend prints (SetuptoolsDeprecationWarning, pip's BuildBackendWarning
# around one, ...) or a deprecation notice; distutils' own "warning: build_py: ..." lines are logs.
BUILD_WARNING = re.compile(r"(?i:deprecat)|\w+Warning\b")


def copy_sources(dest: Path) -> Path:
    """The repository's files as a checkout holds them (tracked, plus new files git does not
    ignore) copied to dest: builds write build/ and *.egg-info there, not into the working tree,
    and each copy starts without what an earlier build left."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                            cwd=REPO, capture_output=True, text=True, check=True).stdout
    for name in filter(None, listed.split("\0")):
        source = REPO / name
        if source.is_file():  # a tracked file deleted in the working tree is not part of the checkout
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, dest / name)
    return dest


def run(*args, cwd: Path, timeout: int = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # sys.path as a user's
    return subprocess.run([str(a) for a in args], cwd=str(cwd), capture_output=True, text=True,
                          timeout=timeout, env={**full_env, **(env or {})})


def ok(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, f"{result.args}\nstdout:\n{result.stdout[-3000:]}\nstderr:\n{result.stderr[-5000:]}"
    return result


def repo_configs(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in (root / "conf").rglob("*.yaml")}


def repo_modules(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in (root / "ssltrain").rglob("*.py")}


def make_venv(path: Path, install: str | Path) -> Path:
    """A fresh virtualenv with `pip install --no-deps <install>`, then the dependencies of this
    interpreter made visible (see the module docstring)."""
    ok(run(sys.executable, "-m", "venv", path, cwd=path.parent))
    python = path / "bin" / "python"
    ok(run(python, "-m", "pip", "install", "--quiet", "--no-deps", install, cwd=path.parent))
    site = ok(run(python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])", cwd=path)).stdout.strip()
    Path(site, "zz_ssltrain_test_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return path


@pytest.fixture(scope="module")
def wheel_build(tmp_path_factory):
    """(source copy, `pip wheel` result, wheel path): built once for this file, with build isolation."""
    source = copy_sources(tmp_path_factory.mktemp("wheel-source"))
    dist = tmp_path_factory.mktemp("wheel-dist")
    result = ok(run(sys.executable, "-m", "pip", "wheel", "-v", "--no-deps", "-w", dist, ".", cwd=source))
    (wheel,) = dist.glob("ssltrain-*.whl")
    return source, result, wheel


@pytest.fixture(scope="module")
def wheel_venv(wheel_build, tmp_path_factory):
    return make_venv(tmp_path_factory.mktemp("wheel-venv") / "venv", wheel_build[2])


@pytest.fixture
def workdir(tmp_path) -> Path:
    """An unrelated working directory: no conf/ and no ssltrain/ of the repository around."""
    path = tmp_path / "elsewhere"
    path.mkdir()
    return path


def wheel_names(wheel: Path) -> set[str]:
    with zipfile.ZipFile(wheel) as archive:
        return set(archive.namelist())


def test_wheel_ships_every_config_under_ssltrain_conf(wheel_build):
    """Catches configs missing from the wheel (the install then fails at start): a package-data
    glob narrowed to a list of files, a new config group or file under conf/ that the packaging
    does not pick up, or the ssltrain.conf mapping dropped."""
    source, _, wheel = wheel_build
    configs = repo_configs(source)
    assert "conf/train.yaml" in configs
    shipped = {n.removeprefix("ssltrain/") for n in wheel_names(wheel) if n.startswith("ssltrain/conf/")}
    assert shipped == configs


def test_wheel_ships_every_module(wheel_build):
    """Catches a subpackage of ssltrain left out of the hand-written `packages` list of
    pyproject.toml (its modules would be missing from every non-editable install)."""
    source, _, wheel = wheel_build
    shipped = {n for n in wheel_names(wheel) if n.startswith("ssltrain/") and n.endswith(".py")}
    assert shipped == repo_modules(source)


def test_wheel_build_gives_no_warning(wheel_build):
    """Catches pyproject.toml settings that setuptools deprecates or warns about (a
    `project.license` table, conf/model etc. taken for packages absent from `packages` when
    include-package-data is on, ...): today's warnings are the build errors of a later setuptools."""
    _, result, _ = wheel_build
    assert "ssltrain" in result.stdout + result.stderr  # -v: the backend's own output is there
    warnings = [line for line in (result.stdout + result.stderr).splitlines() if BUILD_WARNING.search(line)]
    assert not warnings, "\n".join(warnings)


def test_sdist_builds_a_wheel_with_every_config(tmp_path):
    """Catches an sdist without conf/ (or without what the build needs): a wheel built from it,
    as `python -m build` or `pip install` from an index does, would lack the configs. The sdist
    is built the way a build frontend does it: setuptools>=77 in a folder of its own, then the
    build_sdist hook; no build warning either."""
    source = copy_sources(tmp_path / "source")
    backend = tmp_path / "backend"
    ok(run(sys.executable, "-m", "pip", "install", "--quiet", "--target", backend, "setuptools>=77", cwd=tmp_path))
    built = ok(run(sys.executable, "-c", "import sys; from setuptools import build_meta; "
                   "print(build_meta.build_sdist(sys.argv[1]))", tmp_path / "sdist",
                   cwd=source, env={"PYTHONPATH": str(backend)}))
    assert not BUILD_WARNING.search(built.stderr), built.stderr
    sdist = tmp_path / "sdist" / built.stdout.strip().splitlines()[-1]
    with tarfile.open(sdist) as archive:
        members = {m.name.split("/", 1)[1] for m in archive.getmembers() if m.isfile()}
    assert repo_configs(source) <= members and "pyproject.toml" in members

    result = ok(run(sys.executable, "-m", "pip", "wheel", "--no-deps", "-w", tmp_path / "wheel", sdist, cwd=tmp_path))
    assert not BUILD_WARNING.search(result.stderr), result.stderr
    (wheel,) = (tmp_path / "wheel").glob("ssltrain-*.whl")
    shipped = {n.removeprefix("ssltrain/") for n in wheel_names(wheel) if n.startswith("ssltrain/conf/")}
    assert shipped == repo_configs(source)


def check_installed(venv: Path, source: Path, workdir: Path, cache_dir: Path) -> None:
    """ssltrain imports from the virtualenv (not the repository) with every config of source
    installed, reads those packaged configs (Hydra's search path holds them once, and nothing of
    the repository), and `ssltrain --cfg job` composes the default run from an unrelated directory."""
    python, bin_dir = venv / "bin" / "python", venv / "bin"
    where = ok(run(python, "-c", "import ssltrain, ssltrain.paths; print(ssltrain.__file__); "
                   "print(ssltrain.paths.config_dir())", cwd=workdir)).stdout.split()
    package, conf = (Path(p).resolve() for p in where)
    assert package.is_relative_to(venv.resolve()), f"ssltrain imported from {package}, not from {venv}"
    assert conf == package.parent / "conf", conf
    assert {f"conf/{p.relative_to(conf).as_posix()}" for p in conf.rglob("*.yaml")} == repo_configs(source)

    env = {"SSLTRAIN_CACHE": str(cache_dir)}
    composed = ok(run(bin_dir / "ssltrain", "--cfg", "job", cwd=workdir, env=env)).stdout
    assert re.search(r"^model:", composed, re.M) and re.search(r"^objective:", composed, re.M), composed
    searchpath = ok(run(bin_dir / "ssltrain", "--info", "searchpath", cwd=workdir, env=env)).stdout
    assert searchpath.count(f"file://{conf}") == 1, searchpath
    assert str(REPO) not in searchpath, searchpath
    assert not list(workdir.iterdir()), "an info command wrote into the working directory"


def test_wheel_install_composes_and_lists(wheel_build, wheel_venv, workdir, cache_dir):
    """Catches a wheel whose installed ssltrain cannot find its configs (config_dir() looking only
    beside the package, as in a checkout), reads the repository's instead, or whose console
    scripts (`ssltrain`, `ssltrain-list`) are missing or fail at start."""
    check_installed(wheel_venv, wheel_build[0], workdir, cache_dir)
    # ssltrain-list checks every objective against every model and data option (~30 s here), so
    # it runs for this install only.
    listing = ok(run(wheel_venv / "bin" / "ssltrain-list", cwd=workdir, env={"SSLTRAIN_CACHE": str(cache_dir)}))
    assert "mlm" in listing.stdout, listing.stdout


def test_wheel_install_trains(wheel_venv, workdir, cache_dir):
    """Catches a non-editable install that starts but cannot run: a module, default config or
    file the default run needs that only a checkout has. Runs the defaults (tiny BERT, embedded
    corpus) for 3 steps and checks the export and the closing metrics record."""
    run_dir = workdir / "run"
    ok(run(wheel_venv / "bin" / "ssltrain", "trainer.max_steps=3", f"hydra.run.dir={run_dir}",
           cwd=workdir, env={"SSLTRAIN_CACHE": str(cache_dir)}))
    assert (run_dir / "final" / "model.safetensors").is_file()
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]
    end = [r for r in records if r["kind"] == "end"]
    assert end and end[-1]["step"] == 3, records[-3:]


def test_directory_install_composes_and_lists(tmp_path_factory, workdir, cache_dir):
    """`pip install .` (a non-editable install straight from the source directory): catches
    packaging that works for `pip wheel` but not for the directory install path, and the same
    start failures as the wheel test."""
    source = copy_sources(tmp_path_factory.mktemp("directory-source"))
    venv = make_venv(tmp_path_factory.mktemp("directory-venv") / "venv", source)
    check_installed(venv, source, workdir, cache_dir)
