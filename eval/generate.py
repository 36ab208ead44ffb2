"""Answers from a fine-tuned model, streamed: one question, several, or a chat.

    python -m eval.generate --adapter runs/lora/r8/adapter "What is the capital of Zantheria?"
    python -m eval.generate --model runs/lora/r8/merged --chat
    python -m eval.generate --adapter runs/lora/r8/adapter --temperature 0.8 --seed 1 "Hi!"

A model is asked the way it was trained. For a LoRA run's adapter (OUT/rN/adapter)
or merged model (OUT/rN/merged), the run's config.json (OUT/config.json) says how
its rows were rendered — its prompt template or its chat template — and which base
the adapter loads onto (with --demo, the tiny OUT/base_model). Any other model is
asked with its tokenizer's chat template, or Alpaca's prompt template without one.

Answers are greedy unless --temperature is above 0 (then sampled, seeded with
--seed), and end at the tokenizer's EOS or the chat template's end-of-turn.
`--chat` keeps the conversation going in the terminal; a run trained on
instruction rows answers each question on its own (its template holds one turn).
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import torch
from transformers import StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from core.config import build_parser, opt
from core.errors import fail, run_cli
from core.pretrained import load_pretrained
from eval.decoding import answer_text, decode
from tasks.formats import ChatFormat, InstructFormat, run_format
from tasks.adapter_casts import adapter_input_casts


class StopAtText(StoppingCriteria):
    """Stops once the new tokens spell `text` (an end-of-turn of several tokens)."""

    def __init__(self, tokenizer, text: str, prompt_length: int):
        self.tokenizer, self.text, self.prompt_length = tokenizer, text, prompt_length

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        done = [self.text in decode(self.tokenizer, ids[self.prompt_length:].tolist())
                for ids in input_ids]
        return torch.tensor(done, device=input_ids.device)


class AnswerStreamer(BaseStreamer):
    """Prints an answer as its tokens come, holding back what may be the start of its
    end-of-turn (or half a character), and never the end-of-turn itself."""

    def __init__(self, tokenizer, end_of_turn: str | None):
        self.tokenizer, self.end_of_turn = tokenizer, end_of_turn
        self.ids, self.shown, self.prompt_seen = [], 0, False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:  # generate() hands over the prompt first
            self.prompt_seen = True
            return
        self.ids += value.reshape(-1).tolist()
        self._show(final=False)

    def end(self) -> None:
        self._show(final=True)
        print(flush=True)

    def _show(self, final: bool) -> None:
        text = answer_text(self.tokenizer, self.ids, self.end_of_turn)
        if not final:
            text = text.rstrip("\ufffd")
            eot = self.end_of_turn or ""
            held = next((n for n in range(len(eot) - 1, 0, -1) if text.endswith(eot[:n])), 0)
            text = text[:len(text) - held]
        print(text[self.shown:], end="", flush=True)
        self.shown = max(self.shown, len(text))


@torch.no_grad()
def generate_text(model, fmt: InstructFormat | ChatFormat, messages: list[dict],
                  max_new_tokens: int, temperature: float = 0.0, seed: int = 0,
                  streamer: BaseStreamer | None = None) -> str:
    """The model's answer to the conversation `messages` (its last turn a user's)."""
    tokenizer = fmt.tokenizer
    prompt = torch.tensor([fmt.prompt_ids(messages)], device=model.device)
    stop = (StoppingCriteriaList([StopAtText(tokenizer, fmt.end_of_turn, prompt.shape[1])])
            if fmt.end_of_turn else None)
    sampling = {"do_sample": temperature > 0}
    if temperature > 0:
        sampling["temperature"] = temperature
        torch.manual_seed(seed)  # per answer: the same seed gives the same answer in any order
    # Outside autocast an fp32 adapter over a bf16 base needs peft's input casts, which a
    # model built for an autocast run may have off (tasks/adapter_casts.py). Blocks
    # compiled for training (--compile) answer eagerly: a few answers do not repay
    # compiling graphs for the key/value cache, one a layer (core/compiling.py).
    with adapter_input_casts(model), torch.compiler.set_stance("force_eager"):
        out = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt),
                             max_new_tokens=max_new_tokens, eos_token_id=tokenizer.eos_token_id,
                             pad_token_id=tokenizer.pad_token_id, stopping_criteria=stop,
                             streamer=streamer, use_cache=True, **sampling)
    return answer_text(tokenizer, out[0, prompt.shape[1]:].tolist(), fmt.end_of_turn)


def load_adapted(base: str, adapter: str | Path, dtype: torch.dtype = torch.float32):
    """The base model with the adapter put onto it, as a user would load it."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    model = load_pretrained(AutoModelForCausalLM.from_pretrained, base, "base model", dtype=dtype)
    return PeftModel.from_pretrained(model, adapter).eval()


def run_config(path: Path) -> dict | None:
    """The config.json of the LoRA run that saved `path` (OUT/rN/adapter or OUT/rN/merged)."""
    file = path.parent.parent / "config.json"
    if not file.is_file():
        return None
    config = json.loads(file.read_text())
    return config if "lora_r" in config else None


def load_tokenizer(name: str, config: dict | None):
    """The tokenizer saved beside the weights: sentencepiece if the run used that one."""
    slow = (config or {}).get("slow_tokenizer")
    if slow is None:  # no run config: a tokenizer.model alone was saved by the slow one
        path = Path(name)
        slow = (path / "tokenizer.model").is_file() and not (path / "tokenizer.json").is_file()
    if slow:
        from transformers import SentencePieceBackend
        tokenizer = load_pretrained(SentencePieceBackend.from_pretrained, name, "tokenizer")
    else:
        from transformers import AutoTokenizer
        tokenizer = load_pretrained(AutoTokenizer.from_pretrained, name, "tokenizer")
    if tokenizer.pad_token is None:  # generate() pads nothing here, but it wants an id
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
    return tokenizer


@dataclasses.dataclass
class GenerateConfig:
    adapter: str | None = opt(None, "a LoRA adapter directory, such as a run's OUT/r8/adapter")
    model: str | None = opt(None, "a model directory or hub name, such as a run's OUT/r8/merged")
    base: str | None = opt(None, "base model the adapter loads onto (default: the run's, from "
                                 "its config.json, else the adapter's own record)")
    chat: bool = opt(False, "talk in the terminal, turn after turn; an empty line or Ctrl-D ends")
    max_new_tokens: int = opt(256, "most tokens in an answer")
    temperature: float = opt(0.0, "0 answers greedily; above 0 samples at this temperature")
    seed: int = opt(0, "seed for sampling (each answer starts from it)")


def parse(argv: list[str] | None) -> tuple[GenerateConfig, list[str]]:
    parser = build_parser(GenerateConfig, __doc__)
    parser.add_argument("prompts", nargs="*", metavar="PROMPT", help="questions to answer")
    args = vars(parser.parse_args(argv))
    prompts = args.pop("prompts")
    cfg = GenerateConfig(**args)
    if (cfg.adapter is None) == (cfg.model is None):
        raise fail("give either --adapter or --model", "--adapter OUT/r8/adapter, or "
                   "--model OUT/r8/merged")
    if not prompts and not cfg.chat:
        raise fail("nothing to answer", 'give a question ("What is ...?") or --chat')
    if any(not p.strip() for p in prompts):
        raise fail("a prompt is empty", "give each question some text")
    if cfg.max_new_tokens < 1 or cfg.temperature < 0:
        raise fail("--max-new-tokens must be positive and --temperature not negative",
                   "pass e.g. --max-new-tokens 64 --temperature 0")
    if cfg.adapter and not (Path(cfg.adapter) / "adapter_config.json").is_file():
        raise fail(f"{cfg.adapter} holds no LoRA adapter (adapter_config.json)",
                   "point --adapter at a run's rN/adapter, or pass a full model with --model")
    return cfg, prompts


def load(cfg: GenerateConfig):
    """(model, format): the model on this machine's device, asked as its run was trained."""
    path = Path(cfg.adapter or cfg.model)
    config = run_config(path) if path.is_dir() else None
    tokenizer = load_tokenizer(str(path), config)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    if cfg.adapter:
        base = cfg.base or base_of(path, config)
        model = load_adapted(base, path, dtype)
    else:
        from transformers import AutoModelForCausalLM
        model = load_pretrained(AutoModelForCausalLM.from_pretrained, cfg.model, "model",
                                dtype=dtype).eval()
    return model.to(device), run_format(config or {}, tokenizer)


def base_of(adapter: Path, config: dict | None) -> str:
    """The base the run trained: its saved demo base, its --model, or the adapter's record."""
    if config is not None:
        demo_base = adapter.parent.parent / "base_model"
        return str(demo_base) if demo_base.is_dir() else config["model"]
    return json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"]


def chat_loop(model, fmt, cfg: GenerateConfig) -> None:
    """Turn after turn from the terminal, each answer rendered after the whole history."""
    history: list[dict] = []
    note = "" if fmt.kind == "chat" else " (this run's template holds one turn: each " \
                                         "question is answered on its own)"
    print(f"chat{note}; an empty line or Ctrl-D ends", file=sys.stderr)
    while True:
        try:
            line = input("you> ")
        except EOFError:
            break
        if not line.strip():
            break
        history.append({"role": "user", "content": line})
        print("model> ", end="", flush=True)
        answer = generate_text(model, fmt, history, cfg.max_new_tokens, cfg.temperature,
                               cfg.seed, AnswerStreamer(fmt.tokenizer, fmt.end_of_turn))
        history.append({"role": "assistant", "content": answer})


def main(argv: list[str] | None = None) -> int:
    cfg, prompts = parse(argv)
    model, fmt = load(cfg)
    for prompt in prompts:
        if len(prompts) > 1:
            print(f"> {prompt}")
        generate_text(model, fmt, [{"role": "user", "content": prompt}], cfg.max_new_tokens,
                      cfg.temperature, cfg.seed, AnswerStreamer(fmt.tokenizer, fmt.end_of_turn))
    if cfg.chat:
        chat_loop(model, fmt, cfg)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
