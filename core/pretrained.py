"""Loading models and tokenizers by name or path, with one-line errors."""

import warnings
from typing import Any, Callable, TypeVar

from core.errors import fail

T = TypeVar("T")
# peft (building an adapted model) and generate() read a property transformers itself
# deprecated: a notice for those libraries, which every LoRA run printed once a rank.
warnings.filterwarnings("ignore", "`is_gradient_checkpointing` is deprecated", FutureWarning)


def load_pretrained(loader: Callable[..., T], name: str, what: str, **kwargs: Any) -> T:
    """Call a `from_pretrained` and turn its many failure types into a UsageError."""
    try:
        return loader(name, **kwargs)
    except OSError as err:  # not on the hub, not a directory, or offline
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise fail(f"cannot load {what} '{name}': {first[:200]}",
                   "check the name, pass a local directory, or check your network") from None
    except (ValueError, KeyError) as err:  # a directory that holds something else
        raise fail(f"'{name}' does not hold a usable {what} ({type(err).__name__}: "
                   f"{str(err).splitlines()[0][:160] if str(err) else ''})",
                   "point --model at a model saved with save_pretrained") from None


def max_positions(config: Any) -> int | None:
    """The longest input the model's position table covers, when it has one."""
    for attr in ("max_position_embeddings", "n_positions", "max_seq_len"):
        value = getattr(config, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def check_max_length(config: Any, max_length: int, model_name: str) -> None:
    """--max-length must fit the model's position table."""
    limit = max_positions(config)
    if limit is not None and max_length > limit:
        raise fail(f"--max-length {max_length} is above {model_name}'s limit of {limit} tokens",
                   f"pass --max-length {limit} or less")
