"""Shared fixtures: tiny models, and the real assets of ../shared when present."""

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"

# Tests never reach a hub: a missing model or data set fails at once instead of retrying.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# A training log's figures that measure the machine, not the run: they differ between
# two runs of the same steps (the peak RSS is the process's so far, so it depends on
# what ran before in it). Tests comparing two runs' logs leave them out.
MEASURED = frozenset({"samples_per_s", "tokens_per_s", "tflops", "mfu", "peak_rss_mib"})


def pytest_configure(config):
    """README's command runs the tests in one pytest-xdist worker a core (setup.cfg). Each
    worker, and every process a test starts, then takes one thread: two OpenMP teams on
    the same two cores would each wait at every barrier for a thread the other displaced."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        os.environ["OMP_NUM_THREADS"] = "1"  # the processes tests start
        import torch
        torch.set_num_threads(1)  # this worker


def pytest_collection_modifyitems(config, items):
    """Under xdist, the longest modules first: those with real-asset tests (real models
    trained for minutes), then those with slow ones. The workers are handed a module at a
    time in this order, and the longest started first leave no worker waiting alone at
    the end for a module of minutes handed out last."""
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        return

    def module(item) -> str:
        return item.nodeid.split("::")[0]

    def weight(item) -> int:
        return next((rank for rank, mark in enumerate(("real", "slow"))
                     if item.get_closest_marker(mark)), 2)

    rank: dict[str, int] = {}
    for item in items:
        rank[module(item)] = min(rank.get(module(item), 2), weight(item))
    items.sort(key=lambda item: rank[module(item)])  # stable: the order within a module kept


def shared_path(*parts: str) -> Path:
    """A path under ../shared, skipping the test cleanly where the assets are absent."""
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"real asset {path} is absent")
    return path


@pytest.fixture(scope="session")
def smollm2() -> Path:
    """SmolLM2-135M-Instruct, a real pretrained chat LM: ../shared holds only its recipe,
    which builds it (~25 s) into a cache outside the checkout and ../shared, once per
    machine (bench/shared_models.py); skipped where ../shared is absent."""
    from bench.shared_models import built_model
    shared_path("models", "smollm2-135m-instruct", "make.py")
    return built_model("smollm2-135m-instruct", SHARED)


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    """A seeded tiny Llama saved to disk (hidden 64, 2 layers, 300 tokens): every
    projection LoRA targets, at a size where a test's steps take milliseconds."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig
    path = tmp_path_factory.mktemp("tiny_llama") / "llama"
    config = LlamaConfig(hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                         vocab_size=300, num_attention_heads=4, num_key_value_heads=4)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for modules of tiny models: they gain nothing from a second one,
    and on a busy 2-core machine competing OpenMP threads make them many times slower."""
    import torch
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def threads_for_load():
    """Every core for a module of real-model tests on an idle machine, one thread on a busy
    one (this 2-core machine is shared, CI included): the real LM tests run 1.65x faster
    on two idle cores than on one, but 4x slower with two threads than with one at a
    load of 10, where each OpenMP barrier waits for a thread the other jobs displaced.
    Busy: a 1-minute load average above the cores less a half (pytest alone keeps it near 1)."""
    import torch
    before = torch.get_num_threads()
    if os.getloadavg()[0] > (os.cpu_count() or 1) - 0.5:
        torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def lanes_at_every_size(monkeypatch):
    """Lane dropout and chunked attention on tensors of any size: a test's tensors are far
    below the size from which the loop draws from lanes (core.dropout.LANES_FROM)."""
    import core.dropout
    monkeypatch.setattr(core.dropout, "LANES_FROM", 0)


@pytest.fixture
def drawn(monkeypatch) -> list:
    """The keep-masks core.attention's chunked attention draws, chunk by chunk, in order."""
    import core.attention
    masks, draw = [], core.attention.lane_keep

    def record(*args):
        masks.append(draw(*args))
        return masks[-1]
    monkeypatch.setattr(core.attention, "lane_keep", record)
    return masks


@pytest.fixture
def cpu_amp(monkeypatch):
    """Mixed precision on a CPU, standing in for a GPU's: `cpu_amp(module, precision,
    **scaler_kwargs)` makes `module.make_accelerator` return an Accelerator that autocasts
    to `precision` and, for fp16, scales the loss with a GradScaler, as on a GPU.

    Accelerate's state is shared by the whole process and set once (to "no", by every other
    test), and it gives a CPU no fp16 scaler: both are set here for this test alone.
    """
    import torch
    from accelerate import Accelerator

    def patch(module, precision: str, **scaler_kwargs):
        def make_accelerator(mixed_precision: str):
            accelerator = Accelerator()
            monkeypatch.setattr(accelerator.state, "_mixed_precision", precision)
            accelerator.native_amp = True
            if precision == "fp16":
                accelerator.scaler = torch.amp.GradScaler("cpu", **scaler_kwargs)
            return accelerator
        monkeypatch.setattr(module, "make_accelerator", make_accelerator)
    return patch


@pytest.fixture
def first_forward(monkeypatch):
    """`first_forward(TaskClass)` returns a dict that the first training forward of a run
    fills with the trainable weights it runs on: where a run really starts."""
    def watch(task_class) -> dict:
        seen, real = {}, task_class.loss_sum

        def loss_sum(self, model, batch):
            if not seen:
                seen.update({n: p.detach().clone() for n, p in model.named_parameters()
                             if p.requires_grad})
            return real(self, model, batch)

        monkeypatch.setattr(task_class, "loss_sum", loss_sum)
        return seen
    return watch
