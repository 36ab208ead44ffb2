"""Samples: the same questions answered by the base model and after each r, side by side.

The sweep's prompts — `--sample-prompt`, the lines of `--sample-prompts FILE`, and
the questions of `--add-example` (so the study's question, "does the model now
answer what I added?", is answered in the run's own report) — are put to the
untrained model once (LoRA's B starts at zero, so that is the base model) and to
each rank once trained. Answers are greedy unless `--sample-temperature` is above 0
(then sampled, seeded with --seed), rendered with the run's own template, and cut
at the EOS or the chat template's end-of-turn (eval/generate.py).

Each set of answers is saved as soon as it exists — OUT/samples_base.json,
OUT/rN/samples.json — so a resumed sweep keeps them; at the end `samples.md` puts
them side by side (prompt | base | r=4 | r=8 | ...) and the table is printed.
Only the main process generates, on a whole model: the other processes wait.
"""

from __future__ import annotations

import json
from pathlib import Path

from core import run_dir
from core.errors import fail
from eval.generate import generate_text

BASE_FILE = "samples_base.json"
NOT_SAMPLED = "—"  # a rank that finished before a resumed sweep added the prompt
EMPTY = "(nothing: it ended the answer at once)"


def sample_prompts(cfg) -> list[str]:
    """Every prompt to answer, each once, in the order given."""
    prompts = list(cfg.sample_prompt)
    if cfg.sample_prompts:
        try:
            lines = Path(cfg.sample_prompts).read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as err:
            raise fail(f"cannot read --sample-prompts {cfg.sample_prompts} "
                       f"({type(err).__name__})",
                       "give a UTF-8 file, one prompt per line") from None
        from_file = [line.strip() for line in lines if line.strip()]
        if not from_file:
            raise fail(f"--sample-prompts {cfg.sample_prompts} holds no prompt",
                       "write one prompt per line")
        prompts += from_file
    prompts += [question for question, _ in cfg.add_example]
    return list(dict.fromkeys(prompts))


class Sampler:
    """Answers the sweep's prompts with a model into a JSON file; nothing without prompts."""

    def __init__(self, prompts: list[str], fmt, cfg):
        self.prompts, self.fmt = prompts, fmt
        self.max_new_tokens, self.temperature = cfg.sample_max_new_tokens, cfg.sample_temperature
        self.seed = cfg.seed

    def __call__(self, model, path: Path) -> None:
        if not self.prompts:
            return
        model.eval()  # no dropout in an answer
        answers = [generate_text(model, self.fmt, [{"role": "user", "content": prompt}],
                                 self.max_new_tokens, self.temperature, self.seed)
                   for prompt in self.prompts]
        run_dir.write_json(path, {"prompts": self.prompts, "answers": answers})


def _answers(path: Path) -> dict[str, str]:
    if not path.is_file():
        return {}
    saved = json.loads(path.read_text())
    return dict(zip(saved["prompts"], saved["answers"]))


def _cell(text: str) -> str:
    """Text inside a markdown table cell: pipes escaped, lines joined."""
    return text.replace("|", "\\|").replace("\n", "<br>") or " "


def write_samples(out_dir: Path, prompts: list[str], ranks: list[int],
                  added: dict[str, str]) -> None:
    """samples.md from the saved answers, and the table printed. `added` maps the
    questions of --add-example to the answers they were given for training."""
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    columns = {"base": _answers(out_dir / BASE_FILE)}
    columns.update({f"r={r}": _answers(out_dir / f"r{r}" / "samples.json") for r in ranks})
    header = ["prompt", *columns]
    rows = [[prompt + (f" (added: {added[prompt]})" if prompt in added else ""),
             *(answers.get(prompt, NOT_SAMPLED) or EMPTY for answers in columns.values())]
            for prompt in prompts]
    lines = ["# Samples", "", "The same prompts answered by the base model and after each r "
             "(greedy unless the run set --sample-temperature).", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    (out_dir / "samples.md").write_text("\n".join(lines) + "\n")
    table = Table(title="Samples", show_lines=True)
    for name in header:
        table.add_column(name, overflow="fold")
    for row in rows:
        table.add_row(*map(Text, row))  # answers are text, not rich markup
    Console().print(table)
