"""Bad input to train_cls.py: exit code 2, one `error:` line, no traceback, nothing written.

Every row goes through `run_cli(train_cls.main, argv)`, as `python train_cls.py ...` does,
with a tiny saved model and small files so that a row that wrongly starts training
still ends in seconds (and fails the row).
"""

import json
import os
from pathlib import Path

import pytest
from transformers import AutoModelForSequenceClassification

import train_cls
from core.demo import tiny_distilbert_config, wordpiece_tokenizer
from core.errors import run_cli

SHARED_MINILM = Path(__file__).resolve().parents[2] / "shared" / "models" / "all-MiniLM-L6-v2"
TEXTS = ["a fine film", "dull and long", "great acting", "a waste of time"] * 4


def jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """Files and a tiny saved model (64 positions) shared by every row."""
    root = tmp_path_factory.mktemp("bad_input")
    model_dir = root / "tiny-model"
    tokenizer = wordpiece_tokenizer(TEXTS, vocab_size=100, max_length=64)
    model = AutoModelForSequenceClassification.from_config(
        tiny_distilbert_config(len(tokenizer), 2, max_length=64))
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    good = [{"text": t, "label": i % 2} for i, t in enumerate(TEXTS)]
    files = {
        "model": str(model_dir),
        "train": jsonl(root / "train.jsonl", good),
        "eval": jsonl(root / "eval.jsonl", good[:4]),
        "no_label": jsonl(root / "no_label.jsonl", [{"text": t} for t in TEXTS[:4]]),
        "float_labels": jsonl(root / "float.jsonl", [{"text": t, "label": i % 2 + 0.5}
                                                    for i, t in enumerate(TEXTS)]),
        "int_text": jsonl(root / "int_text.jsonl", [{"text": i, "label": i % 2}
                                                   for i in range(8)]),
        "str_labels": jsonl(root / "str.jsonl", [{"text": t, "label": ["neg", "pos"][i % 2]}
                                                 for i, t in enumerate(TEXTS)]),
        "unseen_label": jsonl(root / "unseen.jsonl", [{"text": "x", "label": "neg"},
                                                      {"text": "y", "label": "meh"}]),
        "one_class": jsonl(root / "one_class.jsonl", [{"text": t, "label": "pos"} for t in TEXTS]),
        "out_of_range": jsonl(root / "range.jsonl", [{"text": "x", "label": 0},
                                                     {"text": "y", "label": 2}]),
    }
    (root / "empty.jsonl").write_text("")
    files["empty"] = str(root / "empty.jsonl")
    (root / "header.csv").write_text("text,label\n")
    files["header_only"] = str(root / "header.csv")
    (root / "latin1.csv").write_bytes("text,label\nun caf\xe9 cr\xe8me,1\n".encode("latin-1"))
    files["latin1"] = str(root / "latin1.csv")
    (root / "unknown_key.yaml").write_text("lr: 1.0e-4\nlearning_rate: 3\n")
    files["unknown_key"] = str(root / "unknown_key.yaml")
    (root / "quantised.yaml").write_text("load_in_8bit: true\n")
    files["quantised"] = str(root / "quantised.yaml")
    (root / "not_a_model").mkdir()
    (root / "not_a_model" / "notes.txt").write_text("not a model")
    files["not_a_model"] = str(root / "not_a_model")
    (root / "a_file").write_text("x")
    files["a_file"] = str(root / "a_file")
    return files


def base(a: dict) -> list[str]:
    return ["--model", a["model"], "--train-file", a["train"], "--eval-file", a["eval"],
            "--max-length", "32", "--epochs", "1", "--batch-size", "4", "--eval-batch-size", "4"]


# (id, argv builder, what the error line must say). Later flags override `base`.
CASES = [
    ("missing-text-column", lambda a: base(a) + ["--text-column", "sentence"],
     "column 'sentence' not found in the training data"),
    ("missing-label-column-in-eval", lambda a: base(a) + ["--eval-file", a["no_label"]],
     "column 'label' not found in the eval data"),
    ("pair-column-missing", lambda a: base(a) + ["--text-pair-column", "hypothesis"],
     "column 'hypothesis' not found"),
    ("unknown-model-name", lambda a: base(a) + ["--model", "no-such-org/no-such-model-xyz"],
     "cannot load tokenizer 'no-such-org/no-such-model-xyz'"),
    ("directory-without-a-model", lambda a: base(a) + ["--model", a["not_a_model"]],
     "not_a_model"),
    ("unknown-dataset-name", lambda a: ["--model", a["model"], "--dataset",
                                        "no-such-user/no-such-data-xyz"],
     "cannot load data set 'no-such-user/no-such-data-xyz'"),
    ("missing-train-file", lambda a: base(a) + ["--train-file", a["train"] + ".gone"],
     "data file not found"),
    ("non-utf8-file", lambda a: base(a) + ["--train-file", a["latin1"]], "not UTF-8"),
    ("unsupported-file-type", lambda a: base(a) + ["--eval-file", a["unknown_key"]],
     "unsupported data file type '.yaml'"),
    ("train-without-eval-file", lambda a: base(a)[:4] + ["--max-length", "32"],
     "--train-file given without --eval-file"),
    ("float-labels", lambda a: base(a) + ["--train-file", a["float_labels"]],
     "holds float values"),
    ("non-text-column", lambda a: base(a) + ["--train-file", a["int_text"]],
     "holds non-text values"),
    ("eval-label-unseen-in-training", lambda a: base(a) + ["--train-file", a["str_labels"],
                                                         "--eval-file", a["unseen_label"]],
     "labels not seen in training: meh"),
    ("eval-label-out-of-range", lambda a: base(a) + ["--eval-file", a["out_of_range"]],
     "labels outside 0..1"),
    ("empty-eval-file", lambda a: base(a) + ["--eval-file", a["empty"]], "data file is empty"),
    ("eval-file-without-rows", lambda a: base(a) + ["--eval-file", a["header_only"]],
     "has no rows"),
    ("zero-batch-size", lambda a: base(a) + ["--batch-size", "0"], "--batch-size must be positive"),
    ("negative-batch-size", lambda a: base(a) + ["--batch-size=-2"],
     "--batch-size must be positive"),
    ("zero-lr", lambda a: base(a) + ["--lr", "0"], "--lr must be positive"),
    ("negative-lr", lambda a: base(a) + ["--lr=-2e-5"], "--lr must be positive"),
    ("max-length-above-model-limit", lambda a: base(a) + ["--max-length", "128"],
     "--max-length 128 is above"),
    ("max-length-above-minilm-limit", lambda a: base(a) + ["--model", str(SHARED_MINILM),
                                                          "--max-length", "1024"],
     "limit of 512 tokens"),
    ("output-dir-is-a-file", lambda a: base(a) + ["--output-dir", a["a_file"]], "is a file"),
    ("resume-without-checkpoint", lambda a: base(a) + ["--resume-from", "latest"],
     "no checkpoint to resume from"),
    ("resume-from-a-non-checkpoint", lambda a: base(a) + ["--resume-from", a["not_a_model"]],
     "is not a checkpoint"),
    ("unknown-flag", lambda a: base(a) + ["--learning-rate", "1e-4"], "unrecognized arguments"),
    ("bad-flag-value", lambda a: base(a) + ["--epochs", "one"], "invalid float value"),
    ("config-unknown-key", lambda a: base(a) + ["--config", a["unknown_key"]],
     "unknown settings: learning_rate"),
    ("demo-empty-eval-file", lambda a: ["--demo", "--eval-file", a["empty"]],
     "data file is empty"),
    ("demo-zero-lr", lambda a: ["--demo", "--lr", "0"], "--lr must be positive"),
    ("one-class-only", lambda a: base(a) + ["--train-file", a["one_class"]],
     "holds one class only"),
    ("fp16-on-cpu", lambda a: base(a) + ["--mixed-precision", "fp16"],
     "--mixed-precision fp16 is not available here"),
    ("pad-multiple-not-dividing-max-length", lambda a: base(a) + ["--pad-to-multiple-of", "5"],
     "does not divide --max-length 32"),
    ("zero-peak-tflops", lambda a: base(a) + ["--peak-tflops", "0"],
     "--peak-tflops must be positive"),
    ("zero-log-every", lambda a: base(a) + ["--log-every", "0"], "--log-every is out of range"),
    ("quantised-base-to-train-cls", lambda a: base(a) + ["--load-in-4bit"],
     "--load-in-4bit: train_cls.py trains every weight"),
    ("quantised-base-in-a-config-file", lambda a: base(a) + ["--config", a["quantised"]],
     "sets load_in_8bit: train_cls.py trains every weight"),
    ("flash-attention-unavailable",  # neither the flash-attn package nor a GPU here
     lambda a: base(a) + ["--attn-implementation", "flash_attention_2"],
     "needs the flash-attn package"),
]


def snapshot(path: Path) -> dict | None:
    if not path.exists():
        return None
    if path.is_file():
        return {".": path.read_bytes()}
    return {str(p.relative_to(path)): (p.read_bytes() if p.is_file() else None,
                                       p.stat().st_mtime_ns) for p in sorted(path.rglob("*"))}


def check_one_clean_error(argv, message, out: Path, capfd):
    before = snapshot(out)
    cwd_before = sorted(os.listdir())
    code = run_cli(train_cls.main, argv)
    captured = capfd.readouterr()
    lines = captured.err.strip().splitlines()
    assert code == 2, captured.err[-2000:]
    assert len(lines) == 1, captured.err[-2000:]
    assert lines[0].startswith("error: ") and message in lines[0], lines[0]
    assert " — " in lines[0]  # what is wrong — how to fix it
    assert "Traceback" not in captured.out + captured.err
    assert snapshot(out) == before  # absent stays absent, a previous run stays untouched
    assert sorted(os.listdir()) == cwd_before  # no runs/cls-TIME created instead


@pytest.mark.parametrize("case_id,build,message", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_clean_error(assets, tmp_path, capfd, case_id, build, message):
    if case_id == "max-length-above-minilm-limit" and not SHARED_MINILM.exists():
        pytest.skip(f"{SHARED_MINILM} is absent")
    argv = build(assets)
    out = Path(assets["a_file"]) if "--output-dir" in argv else tmp_path / "out"
    if "--output-dir" not in argv:
        argv += ["--output-dir", str(out)]
    check_one_clean_error(argv, message, out, capfd)


def test_output_dir_holding_another_run_is_left_alone(assets, tmp_path, capfd):
    out = tmp_path / "previous"
    (out / "model").mkdir(parents=True)
    (out / "metrics.json").write_text('{"accuracy": 0.9}\n')
    (out / "model" / "config.json").write_text("{}\n")
    check_one_clean_error(base(assets) + ["--output-dir", str(out)], "is not empty", out, capfd)
