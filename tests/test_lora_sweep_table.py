"""The sweep table train_lora.py prints at the end: every figure whole at any width.

Issue #15: on a real model (2,442,240 trainable weights) the params column was cut to
"2,442,2…" in an 80-column terminal.
"""

import json

import pytest

from eval.sweep import count_with_unit, write_sweep

# SmolLM2-135M's figures at r 8 (issue #15), and at r 16 the widest a row gets: a long
# CPU run's seconds beside a GPU's tokens/s.
RESULTS = [
    {"r": 8, "lora_alpha": 16.0, "trainable_params": 2_442_240, "total_params": 136_957_248,
     "final_train_loss": 1.93219, "eval_loss": 1.92812, "perplexity": 6.87672,
     "train_s": 274.93, "train_tokens_per_s": 118.2, "eval_loss_before": 1.99513},
    {"r": 16, "lora_alpha": 32.0, "trainable_params": 4_884_480, "total_params": 139_399_488,
     "final_train_loss": 1.90124, "eval_loss": 1.91706, "perplexity": 6.80108,
     "train_s": 1280.47, "train_tokens_per_s": 12345.6, "eval_loss_before": 1.99513},
]


@pytest.mark.parametrize("n, text", [(0, "0"), (999, "999"), (1_000, "1.00 k"),
                                     (36_864, "36.9 k"), (2_442_240, "2.44 M"),
                                     (12_712_960, "12.7 M"), (254_803_968, "255 M"),
                                     (3_426_473_600, "3.43 B"), (9_999, "10.0 k"),
                                     (99_960, "100 k"), (999_999, "1.00 M"),
                                     (999_600_000, "1.00 B")])  # rounding carries a unit
def test_parameter_counts_get_three_figures_and_a_unit(n, text):
    assert count_with_unit(n) == text


def printed_columns(printed: str) -> list[str]:
    """Each body column of a printed rich table, its cells' lines joined top to bottom:
    a figure folded over several lines comes back whole, a cut one does not."""
    lines = printed.splitlines()
    body = lines[next(i for i, line in enumerate(lines) if line.startswith("┡")) + 1:
                 next(i for i, line in enumerate(lines) if line.startswith("└"))]
    columns = [""] * (body[0].count("│") - 1)
    for line in body:
        for i, cell in enumerate(line.split("│")[1:-1]):
            columns[i] += cell.replace(" ", "")
    return columns


@pytest.mark.parametrize("width", [80, 40])
def test_the_printed_table_holds_every_figure_whole(tmp_path, capsys, monkeypatch, width):
    for m in RESULTS:  # write_sweep plots the training curves from each rank's log
        (tmp_path / f"r{m['r']}").mkdir()
        (tmp_path / f"r{m['r']}" / "train_log.jsonl").write_text(
            "".join(json.dumps({"type": "train", "step": s, "loss": 2.0 - s / 10}) + "\n"
                    for s in (1, 2, 3)))
    monkeypatch.setenv("COLUMNS", str(width))  # rich sizes its console from COLUMNS
    write_sweep(tmp_path, RESULTS)
    printed = capsys.readouterr().out
    table = (tmp_path / "sweep.md").read_text().splitlines()
    assert table[4] == "| 8 | 16 | 2.44 M | 1.78 | 1.9322 | 1.9281 | 6.88 | 274.9 | 118 |"
    rows = [line.strip("| ").split(" | ") for line in table[4:6]]
    assert max(len(line) for line in printed.splitlines()) <= width
    assert printed_columns(printed) == ["".join(row[i].replace(" ", "") for row in rows)
                                        for i in range(len(rows[0]))]
    if width == 80:  # wide enough for one line per rank
        assert sum(line.startswith("│") for line in printed.splitlines()) == len(rows)
