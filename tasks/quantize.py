"""Quantised bases for LoRA: the frozen base in 4-bit NF4 (QLoRA) or in 8-bit.

LoRA never changes the base, so the base need not be stored in a format that can
learn. bitsandbytes stores each Linear weight of the transformer blocks as
- 4-bit NF4 (`--load-in-4bit`): 16 levels placed at the quantiles of a normal
  distribution (pretrained weights are roughly normal), one absmax scale per block
  of 64 weights, and those scales quantised to 8 bits in turn ("double
  quantisation"): about 0.52 bytes per weight instead of 4;
- 8-bit (`--load-in-8bit`, LLM.int8): one int8 per weight and an fp32 scale per row,
  with the rare large input features ("outliers") multiplied in fp16 instead.
A quantised layer dequantises its weight to the compute dtype for every matrix product
(the run's precision: bf16, fp16 or fp32 for 4-bit; 8-bit multiplies in int8/fp16).
The embeddings, the norms and the output layer are not quantised; the LoRA weights and
their AdamW state stay fp32, and gradients flow through the frozen quantised layers to
the adapters of the layers below.

The base is quantised as it is loaded from its unquantised checkpoint, so every rank
of a sweep (and a resumed run) quantises the same weights to the same bits. A
checkpoint saved already quantised by bitsandbytes loads as saved; one quantised in
another format (GPTQ, AWQ, FP8, ...) is refused: its layers are not bitsandbytes'.
"""

import json
import logging
from importlib import metadata
from pathlib import Path

import torch

from core.errors import fail

MIN_BITSANDBYTES = "0.47"  # from this release on, its 4-bit and 8-bit layers run on CPUs too
INSTALL = "pip install -e '.[qlora]'"


def bits(cfg) -> int | None:
    """4 or 8 for a quantised base, None for a base in floating point."""
    return 4 if cfg.load_in_4bit else 8 if cfg.load_in_8bit else None


def installed_bitsandbytes() -> str | None:
    """The installed bitsandbytes version, None when it is not installed."""
    try:
        return metadata.version("bitsandbytes")
    except metadata.PackageNotFoundError:
        return None


def check_settings(cfg) -> None:
    """The quantisation flags against each other, --fsdp and the installed bitsandbytes."""
    if cfg.load_in_4bit and cfg.load_in_8bit:
        raise fail("--load-in-4bit and --load-in-8bit both given", "pick one of the two")
    n = bits(cfg)
    if n is None:
        return
    if cfg.fsdp:
        # FSDP2 flattens and shards each weight; bitsandbytes' packed weights keep their
        # quantisation scales beside the tensor, where sharding would leave them behind.
        raise fail(f"--fsdp with --load-in-{n}bit is not supported (FSDP cannot shard "
                   f"bitsandbytes' quantised weights)", f"drop --fsdp: a {n}-bit base is small "
                   "enough for every process to hold it whole (data parallelism)")
    from packaging.version import Version
    version = installed_bitsandbytes()
    if version is None:
        raise fail(f"--load-in-{n}bit needs the bitsandbytes package, which is not installed",
                   INSTALL)
    if Version(version) < Version(MIN_BITSANDBYTES):
        raise fail(f"--load-in-{n}bit needs bitsandbytes >= {MIN_BITSANDBYTES}, and "
                   f"{version} is installed", INSTALL)


def check_base(config, cfg) -> None:
    """Refuse a base checkpoint that is already quantised, unless bitsandbytes saved it
    in the format asked for (and there is no unquantised base to --merge into then)."""
    saved = getattr(config, "quantization_config", None)
    if saved is None:
        return
    saved = saved if isinstance(saved, dict) else saved.to_dict()
    method = saved.get("quant_method", "unknown")
    if method != "bitsandbytes":
        raise fail(f"{cfg.model} is already quantised ({method}), and its layers cannot take "
                   f"LoRA here", "pass the unquantised model; --load-in-4bit or --load-in-8bit "
                   "quantise it as it loads")
    saved_bits = 4 if saved.get("load_in_4bit") else 8
    if bits(cfg) != saved_bits:
        raise fail(f"{cfg.model} is saved quantised to {saved_bits} bits by bitsandbytes",
                   f"pass --load-in-{saved_bits}bit, or the unquantised model")
    if cfg.merge:
        raise fail(f"--merge needs the unquantised base, and {cfg.model} holds only its "
                   f"{saved_bits}-bit weights", "train on the unquantised model (it is quantised "
                   "as it loads), or drop --merge and merge the adapter into the unquantised "
                   "base with PeftModel.from_pretrained(...).merge_and_unload()")


def compute_dtype(mixed_precision: str) -> torch.dtype:
    """What the quantised layers dequantise to and multiply in: the run's precision."""
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mixed_precision, torch.float32)


def load_kwargs(cfg, source: str, device: torch.device) -> dict:
    """`from_pretrained` arguments for a quantised base; {} for a floating-point one."""
    n = bits(cfg)
    if n is None:
        return {}
    from transformers import AutoConfig, BitsAndBytesConfig
    config = AutoConfig.from_pretrained(source)
    # Placed on its device as it loads: transformers refuses to move an 8-bit model later.
    # The unquantised weights load in fp32, which is what k-bit preparation keeps them in.
    kwargs = {"device_map": {"": device}, "dtype": torch.float32}
    if getattr(config, "quantization_config", None) is None:  # else: as bitsandbytes saved it
        kwargs["quantization_config"] = (
            BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                               bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=compute_dtype(cfg.mixed_precision))
            if n == 4 else BitsAndBytesConfig(load_in_8bit=True))
    return kwargs


def prepare(base, cfg):
    """peft's k-bit preparation of a quantised base, before adapters are added.

    It freezes every weight of the base (the quantised ones cannot learn; LoRA adds the
    weights that do); it casts every fp16/bf16 weight that is not quantised (norms,
    embeddings, output layer) to fp32, so the norms' statistics and the logits are
    computed in full precision (on a 3B Llama that is 0.8 GB of fp32 embeddings and
    output layer instead of 0.4 GB in bf16: the price of peft's choice). It can also
    make the embeddings' output require a gradient, which only *reentrant* gradient
    checkpointing needs (a checkpointed block whose inputs need no gradient would
    give its LoRA weights none); this project checkpoints non-reentrantly
    (lora_model.build_lora_model), so that part stays off.
    """
    from peft import prepare_model_for_kbit_training
    base = prepare_model_for_kbit_training(base, use_gradient_checkpointing=False)
    compute = compute_dtype(cfg.mixed_precision)
    for module in base.modules():
        if hasattr(module, "compute_dtype"):  # a checkpoint saved quantised too
            module.compute_dtype = compute
        # On a CPU with AVX512-BF16, a 4-bit layer run in eval mode without gradients
        # repacks its weight in place into an inference layout that has no backward
        # pass (and needs widths divisible by 32): evaluation in the middle of training
        # would leave the base unable to train. One layout, for evaluation and training.
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    return base


def merge_dtype(cfg, dtype: torch.dtype) -> torch.dtype:
    """The dtype --merge loads the base in: a quantised base's weights cannot hold the
    merged sums, so the adapter goes into the unquantised base in half precision
    (fp16 for an fp16 run, bf16 otherwise), the dtype such checkpoints are shipped in."""
    if bits(cfg) is None:
        return dtype
    return torch.float16 if cfg.mixed_precision == "fp16" else torch.bfloat16


def merge_note(cfg, r: int, source: str) -> str:
    """What --merge does with a quantised base, said in the run's output."""
    dtype = str(merge_dtype(cfg, torch.float32)).removeprefix("torch.")
    return (f"r{r}: merging the adapter into the unquantised base ({source}) loaded in {dtype}, "
            f"not into its {bits(cfg)}-bit weights -> r{r}/merged")


def check_resume(config_path: Path, cfg) -> None:
    """A resumed sweep trains on the kind of base its checkpoints were trained on."""
    if not config_path.is_file():
        return
    saved = json.loads(config_path.read_text())
    was = 4 if saved.get("load_in_4bit") else 8 if saved.get("load_in_8bit") else None
    if was != bits(cfg):
        raise fail(f"the sweep in {config_path.parent} trained on {_kind(was)} base, and this "
                   f"run asks for {_kind(bits(cfg))} one", "resume with " + (
                       f"--load-in-{was}bit" if was else "neither --load-in-4bit nor "
                       "--load-in-8bit"))


def _kind(n: int | None) -> str:
    return f"a {n}-bit" if n else "an unquantised"


def weight_bytes(module: torch.nn.Module, trainable: bool = False) -> int:
    """Bytes of the module's frozen (or, with `trainable`, trainable) weights and buffers,
    counted from their storage, quantisation scales included; a tensor shared by several
    layers counts once. Under FSDP, this process's shards."""
    seen, total = set(), 0

    def add(tensor) -> None:
        nonlocal total
        tensor = tensor.to_local() if hasattr(tensor, "to_local") else tensor  # FSDP: a shard
        if isinstance(tensor, torch.Tensor) and tensor.data_ptr() not in seen:
            seen.add(tensor.data_ptr())
            total += tensor.untyped_storage().nbytes()

    for param in module.parameters():
        if param.requires_grad != trainable:
            continue
        add(param)
        state = getattr(param, "quant_state", None)  # 4-bit: block scales, and theirs
        for owner in (state, getattr(state, "state2", None)):
            for name in ("absmax", "code", "offset"):
                add(getattr(owner, name, None))
        add(getattr(param, "SCB", None))  # 8-bit: one scale per row
    if not trainable:
        for buffer in module.buffers():
            add(buffer)
    return total


class _Drop(logging.Filter):
    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefix)


def _quiet_bitsandbytes() -> None:
    """Drop two bitsandbytes notices that say nothing to act on: on CPUs, that an optional
    kernel package from the hub is absent (its own kernel runs instead), and, from the
    8-bit layers, that inputs are cast to fp16 — once per layer per step.

    Called as this module is imported: peft imports bitsandbytes whenever it is
    installed, and the first notice comes with that import, quantised run or not."""
    for logger, prefix in (("bitsandbytes.backends.cpu.ops", "Failed to load CPU gemm_4bit"),
                           ("bitsandbytes.autograd._functions", "MatMul8bitLt: inputs will")):
        logger = logging.getLogger(logger)
        if not any(isinstance(f, _Drop) for f in logger.filters):
            logger.addFilter(_Drop(prefix))


_quiet_bitsandbytes()
