"""core.config: flags over config file over defaults, validation, and the study's configs."""

import json
from pathlib import Path

import pytest

import train_cls
from core.config import parse_config
from core.errors import UsageError

ROOT = Path(__file__).resolve().parents[1]


def parse(argv):
    return parse_config(train_cls.ClsConfig, argv, train_cls.__doc__)


def write(path: Path, text: str) -> str:
    path.write_text(text, encoding="utf-8")
    return str(path)


# --- the course study ---------------------------------------------------------------------

STUDY = {
    "baseline": ({"lr": 2e-5, "epochs": 1.0, "weight_decay": 0.01, "batch_size": 16,
                  "eval_batch_size": 16}, "90.36 93.19 87.16 90.08"),
    "method1": ({"lr": 3e-5, "epochs": 3.0, "weight_decay": 0.01, "batch_size": 16,
                 "eval_batch_size": 16}, "91.91 92.16 91.68 91.92"),
    "method2": ({"lr": 2e-5, "epochs": 1.0, "weight_decay": 0.05, "batch_size": 32,
                 "eval_batch_size": 32}, "91.84 92.44 91.20 91.81"),
}


@pytest.mark.parametrize("name", STUDY)
def test_study_config_parses_to_the_intended_settings(name):
    path = ROOT / "configs" / f"cls_{name}.yaml"
    cfg = parse(["--config", str(path)])
    expected, _ = STUDY[name]
    for key, value in expected.items():
        got = getattr(cfg, key)
        assert got == value and type(got) is type(value), (key, got)
    assert cfg.model == "distilbert-base-uncased" and cfg.dataset == "imdb"
    assert (cfg.train_split, cfg.eval_split) == ("train", "test")
    assert (cfg.text_column, cfg.label_column) == ("text", "label")
    assert cfg.max_length == 512
    assert cfg.run_name == name and cfg.output_dir == f"runs/study/{name}"
    # Everything else is the shared default, so the three runs differ only where meant.
    defaults = parse([])
    changed = {k for k, v in vars(cfg).items() if v != getattr(defaults, k)}
    assert changed == {"config", "run_name", "output_dir"} | {
        k for k, v in expected.items() if v != getattr(defaults, k)}


@pytest.mark.parametrize("name", STUDY)
def test_study_config_records_the_study_result(name):
    text = (ROOT / "configs" / f"cls_{name}.yaml").read_text()
    comments = " ".join(line for line in text.splitlines() if line.lstrip().startswith("#"))
    for figure in STUDY[name][1].split():
        assert figure in comments, figure


# --- precedence -----------------------------------------------------------------------------

@pytest.mark.parametrize("suffix", [".json", ".yaml", ".yml"])
def test_flags_override_the_config_file(tmp_path, suffix):
    values = {"lr": 3e-5, "batch_size": 8, "epochs": 2.5, "run_name": "from-file",
              "warmup_steps": 3}
    text = json.dumps(values)  # JSON is YAML too
    path = write(tmp_path / f"c{suffix}", text)
    cfg = parse(["--config", path])
    assert (cfg.lr, cfg.batch_size, cfg.epochs, cfg.run_name, cfg.warmup_steps) == (
        3e-5, 8, 2.5, "from-file", 3)
    # A flag wins wherever it stands relative to --config.
    for argv in (["--config", path, "--lr", "1e-4"], ["--lr", "1e-4", "--config", path]):
        cfg = parse(argv)
        assert cfg.lr == 1e-4 and cfg.batch_size == 8
    # Unset in file and flags: the dataclass default.
    assert parse(["--config", path]).weight_decay == 0.01


def test_yaml_file_with_flag_spelling_and_lists(tmp_path):
    path = write(tmp_path / "c.yaml", "batch-size: 4\nmax_length: 64\nlr: 1.0e-4\n"
                                      "text-pair-column: premise\ndataset: null\n")
    cfg = parse(["--config", path])
    assert (cfg.batch_size, cfg.max_length, cfg.lr, cfg.text_pair_column) == (4, 64, 1e-4,
                                                                              "premise")
    assert cfg.dataset == "imdb"  # null means "not set here": the default stays


def test_a_list_of_a_flag_given_once_a_value(tmp_path):
    # --sample-prompt takes one prompt a time: a file's list was spelt as one flag with
    # every prompt after it, and argparse refused the second.
    import train_lora
    path = write(tmp_path / "c.yaml", 'sample_prompt:\n  - "Hi there"\n  - "-1 or 1?"\n')
    cfg = parse_config(train_lora.LoraRunConfig, ["--config", path], train_lora.__doc__)
    assert cfg.sample_prompt == ["Hi there", "-1 or 1?"]


@pytest.mark.parametrize("suffix", [".json", ".yaml"])
def test_empty_lists_in_the_file_keep_the_defaults(tmp_path, suffix):
    """Issue #16, extra item: a file holding an empty list (`add_example: []`, the default)
    failed with "--add-example: expected 2 arguments"; an empty list now means "none"."""
    import train_lora
    values = {"add_example": [], "target_modules": [], "lora_r": [4, 8]}
    text = json.dumps(values) if suffix == ".json" else \
        "add_example: []\ntarget_modules: []\nlora_r: [4, 8]\n"
    cfg = parse_config(train_lora.LoraRunConfig, ["--config", write(tmp_path / f"c{suffix}", text)],
                       train_lora.__doc__)
    assert cfg.add_example == [] and cfg.lora_r == [4, 8]
    assert cfg.target_modules == train_lora.LLAMA_PROJECTIONS


@pytest.mark.parametrize("suffix", [".json", ".yaml"])
def test_bool_settings_from_the_file(tmp_path, suffix):
    text = ('{"group_by_length": false, "overwrite": true}' if suffix == ".json"
            else "group_by_length: false\noverwrite: yes\n")
    path = write(tmp_path / f"c{suffix}", text)
    cfg = parse(["--config", path])
    assert cfg.group_by_length is False and cfg.overwrite is True
    cfg = parse(["--config", path, "--group-by-length", "--no-overwrite"])
    assert cfg.group_by_length is True and cfg.overwrite is False
    assert parse([]).group_by_length is True and parse([]).overwrite is False


def test_unknown_key_in_the_file_is_named(tmp_path):
    path = write(tmp_path / "c.yaml", "lr: 1.0e-4\nlearning_rate: 3\nbatchsize: 2\n")
    with pytest.raises(UsageError, match="unknown settings: batchsize, learning_rate"):
        parse(["--config", path])


@pytest.mark.parametrize("name,content,message", [
    ("missing.yaml", None, "cannot read config file"),
    ("bad.json", '{"lr": 2e-5,', "is not valid JSON"),
    ("bad.yaml", "lr: [1, 2\nbatch_size: 3", "is not valid YAML"),
    ("list.yaml", "- lr\n- 2e-5\n", "does not hold a mapping"),
    ("empty.json", "", "is not valid JSON"),
    ("latin1.yaml", b"run_name: caf\xe9\n", "cannot read config file"),
    ("wrong_type.json", '{"batch_size": "many"}', "invalid int value"),
])
def test_bad_config_file_is_a_usage_error(tmp_path, name, content, message):
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content)
    with pytest.raises(UsageError, match=message) as err:
        parse(["--config", str(path)])
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("argv,hint", [
    (["--return-cpu-memory"], "use --cpu-memory return"),
    (["--return-cpu-memory=true"], "use --cpu-memory return"),
    (["--no-return-cpu-memory"], "use --cpu-memory glibc"),
])
def test_the_old_memory_flag_is_refused_naming_its_successor(argv, hint):
    with pytest.raises(UsageError, match="replaced by --cpu-memory") as err:
        parse(argv)
    assert hint in str(err.value) and "\n" not in str(err.value)


def test_the_old_memory_setting_in_a_file_is_refused_too(tmp_path):
    path = write(tmp_path / "c.yaml", "return-cpu-memory: false\n")
    with pytest.raises(UsageError, match="replaced by --cpu-memory"):
        parse(["--config", path])
    assert parse(["--cpu-memory", "reuse"]).cpu_memory == "reuse"
    assert parse([]).cpu_memory == "auto"


# --- validation -----------------------------------------------------------------------------

@pytest.mark.parametrize("argv,message", [
    (["--batch-size", "0"], "--batch-size must be positive, got 0"),
    (["--batch-size", "-4"], "--batch-size must be positive, got -4"),
    (["--eval-batch-size", "0"], "--eval-batch-size must be positive"),
    (["--lr", "0"], "--lr must be positive, got 0.0"),
    (["--lr=-1e-5"], "--lr must be positive, got -1e-05"),
    (["--lr", "nan"], "--lr must be positive, got nan"),
    (["--grad-accum", "0"], "--grad-accum must be positive"),
    (["--epochs", "0"], "--epochs must be positive"),
    (["--max-length", "0"], "--max-length must be positive"),
    (["--weight-decay", "-0.1"], "--weight-decay must not be negative"),
    (["--warmup-ratio", "1"], "--warmup-ratio must be in"),
    (["--max-steps", "0"], "--max-steps is out of range"),
    (["--warmup-steps", "-1"], "--warmup-steps is out of range"),
    (["--batch-size", "two"], "argument --batch-size: invalid int value"),
    (["--mixed-precision", "fp8"], "invalid choice"),
    (["--no-such-flag"], "unrecognized arguments"),
    (["--model", ""], "no model given"),
])
def test_validation_names_the_flag(argv, message):
    with pytest.raises(UsageError, match=message.replace("(", r"\(")) as err:
        parse(argv)
    assert "\n" not in str(err.value)


def test_validation_reads_the_file_too(tmp_path):
    path = write(tmp_path / "c.json", '{"batch_size": 0}')
    with pytest.raises(UsageError, match="--batch-size must be positive"):
        parse(["--config", path])
    assert parse(["--config", path, "--batch-size", "2"]).batch_size == 2


@pytest.mark.parametrize("text,message", [
    ('{"lr": -1e-5}', "--lr must be positive, got -1e-05"),
    ('{"lr": -0.001}', "--lr must be positive, got -0.001"),
    ('{"weight_decay": -0.5}', "--weight-decay must not be negative"),
])
def test_negative_value_in_the_file_gets_the_range_message(tmp_path, text, message):
    # Not argparse's "expected one argument": "-1e-05" must not be read as a flag.
    with pytest.raises(UsageError, match=message):
        parse(["--config", write(tmp_path / "c.json", text)])


def test_file_value_that_looks_like_a_flag_stays_a_value(tmp_path):
    cfg = parse(["--config", write(tmp_path / "c.json", '{"run_name": "--lr", "seed": -3}')])
    assert (cfg.run_name, cfg.seed, cfg.lr) == ("--lr", -3, 2e-5)


def test_warmup_steps_zero_is_allowed():
    assert parse(["--warmup-steps", "0"]).warmup_steps == 0


# --- --demo ---------------------------------------------------------------------------------

class _Parsed(Exception):
    pass


def main_config(monkeypatch, tmp_path, argv):
    """The config train_cls.main resolves from ARGV (stopped before it reads any data)."""
    def stop(cfg):
        raise _Parsed(cfg)
    monkeypatch.setattr(train_cls, "load_rows", stop)
    with pytest.raises(_Parsed) as caught:
        train_cls.main(argv + ["--output-dir", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()
    return caught.value.args[0]


def test_demo_presets_apply_and_flags_override_them(monkeypatch, tmp_path):
    cfg = main_config(monkeypatch, tmp_path, ["--demo"])
    assert (cfg.lr, cfg.epochs, cfg.max_length, cfg.batch_size, cfg.max_train_samples) == (
        1e-3, 4, 128, 16, 1000)
    assert cfg.train_file.endswith("sentiment.jsonl")
    cfg = main_config(monkeypatch, tmp_path,
                      ["--demo", "--epochs", "1", "--lr", "5e-4", "--batch-size", "8"])
    assert (cfg.lr, cfg.epochs, cfg.batch_size, cfg.max_length) == (5e-4, 1, 8, 128)
    assert parse(["--epochs", "1"]).max_length == 512  # the presets come only with --demo
    with pytest.raises(UsageError, match="--batch-size must be positive"):
        main_config(monkeypatch, tmp_path, ["--demo", "--batch-size", "0"])


def test_config_file_overrides_demo_presets(monkeypatch, tmp_path):
    """Defaults < --demo presets < config file < flags: the file is the user's own choice."""
    path = write(tmp_path / "quick.yaml", "epochs: 1\nbatch_size: 8\nmax_train_samples: 64\n")
    cfg = main_config(monkeypatch, tmp_path, ["--demo", "--config", path])
    assert (cfg.epochs, cfg.batch_size, cfg.max_train_samples) == (1, 8, 64)
    assert (cfg.lr, cfg.max_length) == (1e-3, 128)  # presets the file leaves alone
    cfg = main_config(monkeypatch, tmp_path, ["--demo", "--config", path, "--epochs", "2"])
    assert (cfg.epochs, cfg.batch_size) == (2, 8)


def test_demo_from_a_config_file_brings_the_demo_presets(tmp_path):
    def demo_parse(argv):
        return parse_config(train_cls.ClsConfig, argv, train_cls.__doc__, train_cls.DEMO_FLAGS)

    by_flag = demo_parse(["--demo"])
    by_file = demo_parse(["--config", write(tmp_path / "c.yaml", "demo: true\n")])
    by_file.config = None  # the one setting that differs: which file was read
    assert by_file == by_flag and by_flag.lr == 1e-3 and by_flag.train_file
    # The file's and the command line's settings still win over the presets.
    mixed = demo_parse(["--config", write(tmp_path / "d.yaml", "demo: true\nlr: 0.01\n"),
                        "--epochs", "2"])
    assert (mixed.lr, mixed.epochs) == (0.01, 2.0)
    assert demo_parse(["--config", str(tmp_path / "c.yaml"), "--no-demo", "--model", "m"]).lr \
        == 2e-5
