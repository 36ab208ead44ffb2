"""Models that ../shared describes by a recipe (`models/NAME/make.py OUT`), built into a cache.

    from bench.shared_models import built_model
    path = built_model("smollm2-135m-instruct", SHARED)   # ~25 s the first time on a machine

../shared is read-only, and the project must not hold copies of its assets, so a recipe's
output goes to a cache folder outside both: `$RAWTUNE_TEST_CACHE`, else
`~/.cache/rawtune-tests`. The tests (`tests/conftest.py`) and the benchmark share it.

A build goes into a fresh folder beside the cache entry and is renamed into place only
once the recipe has finished, so a killed build never leaves a half model under the
entry's name; a lock file serialises processes that build at the same time (two pytest
runs), and the second one finds the first one's model.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

CACHE_ENV = "RAWTUNE_TEST_CACHE"
# What a finished build holds; the entry is only ever renamed into place whole.
BUILT_FILES = ("config.json", "model.safetensors", "tokenizer.json")
BUILD_TIMEOUT_S = 900  # the recipe takes ~25 s; a hung one must not hold the lock forever


class RecipeMissing(FileNotFoundError):
    """../shared (or the model's recipe in it) is absent: the caller skips."""


def cache_root() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "rawtune-tests")


def _is_built(path: Path) -> bool:
    return all((path / name).is_file() for name in BUILT_FILES)


def built_model(name: str, shared: Path) -> Path:
    """The directory of model `name`, built by `shared/models/NAME/make.py` on first use.

    Raises RecipeMissing without the recipe, RuntimeError (with the recipe's last lines)
    when the build fails.
    """
    recipe = shared / "models" / name / "make.py"
    if not recipe.is_file():
        raise RecipeMissing(f"no recipe at {recipe}")
    out = cache_root() / name
    if _is_built(out):
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.parent / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, or the process dies
        if not _is_built(out):  # another process may have built it while this one waited
            for stale in out.parent.glob(f".{name}-build-*"):  # of a build that was killed
                shutil.rmtree(stale, ignore_errors=True)
            _build(recipe, out)
    return out


def _build(recipe: Path, out: Path) -> None:
    """Run the recipe into a scratch folder beside `out`, then rename the result into place."""
    scratch = Path(tempfile.mkdtemp(prefix=f".{out.name}-build-", dir=out.parent))
    try:
        try:
            done = subprocess.run([sys.executable, str(recipe), str(scratch / "model")],
                                  capture_output=True, text=True, timeout=BUILD_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"{recipe} did not finish in {BUILD_TIMEOUT_S} s") from None
        if done.returncode != 0 or not _is_built(scratch / "model"):
            tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
            raise RuntimeError(f"{recipe} failed (exit {done.returncode}): {' | '.join(tail)}")
        shutil.rmtree(out, ignore_errors=True)  # an entry left incomplete by other means
        (scratch / "model").rename(out)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
