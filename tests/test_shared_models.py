"""bench/shared_models.py: a model of ../shared built from its recipe into the cache, whole
or not at all, once even when two processes ask for it together. A stand-in recipe."""

import subprocess
import sys
import textwrap

import pytest

from bench.shared_models import CACHE_ENV, RecipeMissing, built_model
from conftest import ROOT

# Writes the files of a model one by one into OUT (as make.py does), counting its runs;
# FAIL=1 makes it die half-way, SLEEP=S makes it slow.
RECIPE = textwrap.dedent("""\
    import os, sys, time
    from pathlib import Path
    out = Path(sys.argv[1])
    with open(Path(__file__).with_name("runs.log"), "a") as log:
        log.write("run\\n")
    time.sleep(float(os.environ.get("SLEEP", "0")))
    out.mkdir(parents=True)
    for name in ("config.json", "model.safetensors"):
        (out / name).write_text(name)
    if os.environ.get("FAIL"):
        sys.exit("error: pip failed (no network)")
    (out / "tokenizer.json").write_text("{}")
    print(out)
""")


@pytest.fixture
def shared(tmp_path, monkeypatch):
    recipe = tmp_path / "shared" / "models" / "fake-lm" / "make.py"
    recipe.parent.mkdir(parents=True)
    recipe.write_text(RECIPE)
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    return tmp_path / "shared"


def runs(shared) -> int:
    log = shared / "models" / "fake-lm" / "runs.log"
    return len(log.read_text().splitlines()) if log.exists() else 0


def test_built_once_into_the_cache_then_reused(shared, tmp_path):
    path = built_model("fake-lm", shared)
    assert path == tmp_path / "cache" / "fake-lm"
    assert (path / "tokenizer.json").read_text() == "{}"
    assert built_model("fake-lm", shared) == path
    assert runs(shared) == 1
    # Nothing but the entry and its lock is left beside it: the scratch folder is gone.
    assert sorted(p.name for p in path.parent.iterdir()) == ["fake-lm", "fake-lm.lock"]


def test_a_killed_builds_scratch_is_removed_by_the_next_build(shared, tmp_path):
    stale = tmp_path / "cache" / ".fake-lm-build-k1ll3d" / "model"  # SIGKILL mid-build
    stale.mkdir(parents=True)
    (stale / "model.safetensors").write_text("half")
    path = built_model("fake-lm", shared)
    assert sorted(p.name for p in path.parent.iterdir()) == ["fake-lm", "fake-lm.lock"]


def test_a_hung_build_is_stopped(shared, monkeypatch):
    monkeypatch.setenv("SLEEP", "30")
    monkeypatch.setattr("bench.shared_models.BUILD_TIMEOUT_S", 1)
    with pytest.raises(RuntimeError, match="did not finish in 1 s"):
        built_model("fake-lm", shared)


def test_a_failed_build_leaves_no_half_model(shared, tmp_path, monkeypatch):
    monkeypatch.setenv("FAIL", "1")
    with pytest.raises(RuntimeError, match="no network"):
        built_model("fake-lm", shared)
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == ["fake-lm.lock"]
    monkeypatch.delenv("FAIL")
    assert (built_model("fake-lm", shared) / "tokenizer.json").is_file()  # tried afresh
    assert runs(shared) == 2


def test_a_missing_recipe_is_told_apart(tmp_path):
    with pytest.raises(RecipeMissing):
        built_model("fake-lm", tmp_path / "no-shared")


def test_two_processes_at_once_build_it_once(shared, tmp_path, monkeypatch):
    monkeypatch.setenv("SLEEP", "1")  # the second process arrives while the first builds
    code = (f"from bench.shared_models import built_model; "
            f"print(built_model('fake-lm', __import__('pathlib').Path({str(shared)!r})))")
    procs = [subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE,
                              text=True) for _ in range(2)]
    outputs = [proc.communicate(timeout=60)[0].strip() for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0]
    assert outputs == [str(tmp_path / "cache" / "fake-lm")] * 2
    assert runs(shared) == 1
