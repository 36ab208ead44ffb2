"""A real fine-tune: MiniLM on 4,000 SST-2 rows must reach the accuracy HF's Trainer reaches.

The reference (../shared/README.md): HF `Trainer`, same model, rows, seed and baseline
hyperparameters (lr 2e-5, batch 16, 1 epoch, weight decay 0.01) → dev accuracy 0.788.
Our loop must come within a few points of it; a broken loss, schedule, optimizer or
label mapping lands near the majority-class rate (0.51 on dev) instead.

The longest SST-2 sentence is 66 MiniLM tokens (train) and 55 (dev), so --max-length 128
truncates nothing.
"""

import json
import random
import time

import pytest

import train_cls
from conftest import shared_path

N_TRAIN = 4000
SEED = 0
MIN_ACCURACY = 0.76


def read_sst2(path) -> list[tuple[str, int]]:
    """Rows of a GLUE SST-2 file: split on the one tab (no quoting), text stripped."""
    lines = path.read_text(encoding="utf-8").splitlines()
    assert lines[0] == "sentence\tlabel"
    rows = []
    for line in lines[1:]:
        text, label = line.split("\t")
        rows.append((text.strip(), int(label)))
    return rows


def write_tsv(path, rows: list[tuple[str, int]]) -> str:
    path.write_text("sentence\tlabel\n" + "".join(f"{t}\t{y}\n" for t, y in rows),
                    encoding="utf-8")
    return str(path)


@pytest.mark.real
@pytest.mark.slow
def test_minilm_sst2_baseline_reaches_reference_accuracy(tmp_path):
    model = shared_path("models", "all-MiniLM-L6-v2")
    train_rows = read_sst2(shared_path("data", "sst2", "train.tsv"))
    dev_rows = read_sst2(shared_path("data", "sst2", "dev.tsv"))
    assert (len(train_rows), len(dev_rows)) == (67349, 872)
    random.Random(SEED).shuffle(train_rows)
    train_file = write_tsv(tmp_path / "train.tsv", train_rows[:N_TRAIN])
    dev_file = write_tsv(tmp_path / "dev.tsv", dev_rows)
    out = tmp_path / "run"

    start = time.perf_counter()
    code = train_cls.main([
        "--model", str(model), "--train-file", train_file, "--eval-file", dev_file,
        "--text-column", "sentence", "--label-column", "label", "--max-length", "128",
        "--lr", "2e-5", "--batch-size", "16", "--eval-batch-size", "64", "--epochs", "1",
        "--weight-decay", "0.01", "--seed", str(SEED), "--output-dir", str(out)])
    elapsed = time.perf_counter() - start
    assert code == 0

    metrics = json.loads((out / "metrics.json").read_text())
    config = json.loads((out / "config.json").read_text())
    print(f"\nMiniLM on SST-2: dev accuracy {metrics['accuracy']:.4f}, f1 {metrics['f1']:.4f}, "
          f"{metrics['train_s']:.1f}s training, {metrics['train_samples_per_s']:.1f} samples/s, "
          f"{elapsed:.1f}s in all")
    # The whole data set went through: every training row once, every dev row scored.
    assert (config["n_train"], config["n_eval"], metrics["n_eval"]) == (N_TRAIN, 872, 872)
    assert metrics["steps"] == N_TRAIN // 16
    assert metrics["skipped_steps"] == 0
    assert metrics["accuracy"] >= MIN_ACCURACY, metrics
