"""The model side of LoRA fine-tuning: the base's tokenizer and config, the layers
to adapt, the adapted model, and saving (or merging) what was trained.

A LoRA run freezes the base model and adds to each targeted layer a trainable
low-rank update `(alpha/r) * B A` (README, "What LoRA adds to a layer"). Every rank of
a sweep rebuilds the base from the same source and seed, so ranks differ in r alone.
"""

from pathlib import Path

import torch

from core import run_dir
from core.demo import bpe_tokenizer, tiny_llama_config
from core.errors import fail
from core.pretrained import check_max_length, load_pretrained
from tasks import quantize
from tasks.adapter_casts import cast_is_a_round_trip, set_adapter_input_casts
from tasks.adapter_product import adapters_in_one_product
from tasks.instruct import ALPACA_WITH_INPUT
from tasks.lora_start import lora_config

LLAMA_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def use_slow_tokenizer(cfg) -> bool:
    if cfg.slow_tokenizer is not None:
        return cfg.slow_tokenizer
    return "open_llama" in cfg.model.lower()


def load_tokenizer(cfg, train_examples: list[dict]):
    """The model's tokenizer (sentencepiece or fast), or a BPE one trained for --demo."""
    if cfg.uses_demo_model():
        texts = [ALPACA_WITH_INPUT] + [text for e in train_examples for text in e.values() if text]
        return bpe_tokenizer(texts, max_length=cfg.max_length)
    if use_slow_tokenizer(cfg):
        # transformers 5 builds every AutoTokenizer on the fast backend; this class reads
        # tokenizer.model with the sentencepiece library, as the model was trained with.
        from transformers import SentencePieceBackend
        tokenizer = load_pretrained(SentencePieceBackend.from_pretrained, cfg.model,
                                    "sentencepiece tokenizer (tokenizer.model)")
    else:
        from transformers import AutoTokenizer
        tokenizer = load_pretrained(AutoTokenizer.from_pretrained, cfg.model, "tokenizer")
    if tokenizer.pad_token is None:
        # Any id will do: attention masks hide padding and its labels are -100.
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
    return tokenizer


def model_config(cfg, tokenizer):
    if cfg.uses_demo_model():
        config = tiny_llama_config(len(tokenizer), cfg.max_length)
        config.update({"pad_token_id": tokenizer.pad_token_id, "bos_token_id": tokenizer.bos_token_id,
                       "eos_token_id": tokenizer.eos_token_id})
        return config
    from transformers import AutoConfig
    config = load_pretrained(AutoConfig.from_pretrained, cfg.model, "model config")
    check_max_length(config, cfg.max_length, cfg.model)
    return config


def check_target_modules(config, targets: list[str], model_name: str) -> None:
    """Every named target must match a layer LoRA can adapt; checked on a weightless copy."""
    if targets == ["all-linear"]:
        return
    from transformers import AutoModelForCausalLM
    try:
        with torch.device("meta"):  # shapes only: no memory, no download of weights
            skeleton = AutoModelForCausalLM.from_config(config)
    except ValueError as err:
        raise fail(f"{model_name} is not a causal language model ({str(err).splitlines()[0][:120]})",
                   "pass a decoder model such as a Llama") from None
    adaptable = (torch.nn.Linear, torch.nn.Embedding, torch.nn.Conv1d, torch.nn.Conv2d)
    layers = [name for name, module in skeleton.named_modules()
              if isinstance(module, adaptable) or type(module).__name__ == "Conv1D"]
    missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in layers)]
    if missing:
        choices = sorted({name.rsplit(".", 1)[-1] for name in layers})
        raise fail(f"--target-modules {' '.join(missing)} match(es) no layer of {model_name}",
                   f"choose from {', '.join(choices)}, or pass all-linear")


def base_dtype(device: torch.device, mixed_precision: str) -> torch.dtype:
    """The frozen base's dtype: bf16 for bf16 runs and fp16 for fp16 runs, as autocast
    would round its weights to that for every matrix product anyway (keeping them so
    saves that cast each forward, and half the memory); fp32 otherwise. A GPU without
    bf16 keeps an fp32 base. LoRA weights and their optimizer state stay fp32."""
    if mixed_precision == "bf16" and (device.type == "cpu" or torch.cuda.is_bf16_supported()):
        return torch.bfloat16
    return torch.float16 if mixed_precision == "fp16" else torch.float32


def build_lora_model(source: str, r: int, cfg, dtype: torch.dtype, device: torch.device):
    """A fresh base model from `source` with fresh LoRA adapters of rank r; base frozen.
    A quantised base (--load-in-4bit/8bit) is quantised as it loads onto `device`."""
    from accelerate.utils import set_seed
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    set_seed(cfg.seed)  # every rank starts from the same adapter initialisation draws
    quantised = quantize.load_kwargs(cfg, source, device)  # {} for a floating-point base
    base = load_pretrained(AutoModelForCausalLM.from_pretrained, source, "model",
                           **{"dtype": dtype, **quantised},
                           attn_implementation=cfg.attn_implementation)
    if quantised:
        base = quantize.prepare(base, cfg)
    if cfg.gradient_checkpointing:
        # Non-reentrant checkpointing back-propagates into the LoRA weights even
        # though no input of a checkpointed block (the frozen embeddings) needs a gradient.
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        base.config.use_cache = False
    # peft keeps adapter weights in fp32 over a bf16 base (autocast_adapter_dtype).
    model = get_peft_model(base, lora_config(r, cfg))
    if cast_is_a_round_trip(cfg, device):  # peft's cast up, autocast's back down
        set_adapter_input_casts(model, False)
    adapters_in_one_product(model)  # B's product, its scaling and the sum in one addmm
    return model


def save_adapter(model, tokenizer, metrics: dict, r_dir: Path, weights: dict | None) -> None:
    """The adapter (from `weights` when the model is sharded), tokenizer and metrics."""
    # The base's embeddings are never resized here, so the adapter need not carry them
    # (peft would copy lm_head whole into the adapter when lm_head is a target).
    model.save_pretrained(r_dir / "adapter", save_embedding_layers=False, state_dict=weights)
    tokenizer.save_pretrained(r_dir / "adapter")
    run_dir.write_json(r_dir / "metrics.json", metrics)


def save_merged(model, source: str, dtype: torch.dtype, tokenizer, r_dir: Path) -> None:
    """The base with the adapter folded in, to r_dir/merged. A sharded model (None here)
    cannot merge in place: the base is loaded whole on this rank and the saved adapter
    put onto it, as a user would."""
    if model is None:
        from peft import PeftModel
        from transformers import AutoModelForCausalLM
        base = AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
        model = PeftModel.from_pretrained(base, r_dir / "adapter")
    untie_adapted_embeddings(model)
    merged = model.merge_and_unload()  # last: merging folds the adapter into the base for good
    merged.save_pretrained(r_dir / "merged")
    tokenizer.save_pretrained(r_dir / "merged")


def untie_adapted_embeddings(model) -> None:
    """Give the output layer a weight of its own where it shares the input embeddings'
    and either carries an adapter.

    A tied base (SmolLM2, Gemma) holds one matrix for both. An adapter on lm_head
    changes only the output's logits in training, but merging adds its update to that
    one matrix, so the input embeddings would change too and the merged model answer
    otherwise than base plus adapter. Untied, each keeps what it was trained as, and
    the saved config says so, so loading does not tie them again.
    """
    base = model.get_base_model()
    head, embeddings = base.get_output_embeddings(), base.get_input_embeddings()
    if head is None or embeddings is None:
        return
    # peft wraps an adapted layer; the frozen layer it adapts is its base_layer.
    head_base = getattr(head, "base_layer", head)
    embeddings_base = getattr(embeddings, "base_layer", embeddings)
    adapted = head is not head_base or embeddings is not embeddings_base
    if not adapted or head_base.weight is not embeddings_base.weight:
        return
    head_base.weight = torch.nn.Parameter(head_base.weight.detach().clone(), requires_grad=False)
    for config in {id(c): c for c in (base.config, base.config.get_text_config())}.values():
        config.tie_word_embeddings = False


def save_demo_base(config, seed: int, path: Path) -> None:
    """The demo's tiny base, initialised from the seed and saved so adapters can load onto it."""
    from accelerate.utils import set_seed
    from transformers import AutoModelForCausalLM
    set_seed(seed)
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
