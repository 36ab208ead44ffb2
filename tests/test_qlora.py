"""Quantised bases on CPU (bitsandbytes): 4-bit NF4 and 8-bit LoRA on the demo's tiny Llama.

Each quantised run goes through `train_lora.main`, as a user's does; the model it
trains is caught on its way into the loop, with a copy of the frozen base as it was.
"""

import contextlib
import io
import json

import bitsandbytes as bnb
import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import train_lora
from core.collate import pad_batch
from core.errors import run_cli
from tasks import quantize

pytestmark = pytest.mark.usefixtures("one_thread")
QUANTISED = {4: bnb.nn.Linear4bit, 8: bnb.nn.Linear8bitLt}
STEPS = 30
FLAGS = ["--demo", "--lora-r", "8", "--max-train-samples", "120", "--batch-size", "4",
         "--max-length", "128", "--max-steps", str(STEPS), "--eval-every", "10",
         "--eval-batch-size", "64", "--lr", "1e-2"]


def frozen_state(model) -> dict[str, torch.Tensor]:
    """Every frozen weight of the base, with the 4-bit block scales and 8-bit row scales."""
    state = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            state[name] = param.detach().clone()
            quant = getattr(param, "quant_state", None)
            if quant is not None:
                state[name + ".absmax"] = quant.absmax.clone()
    return state


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One run per quantisation: {bits: (out dir, trained model, frozen base before, stdout)}."""
    root, found = tmp_path_factory.mktemp("qlora"), {}
    real_train = train_lora.train
    for bits in (4, 8):
        caught = {}

        def catching(model, *args, **kwargs):
            caught["model"], caught["before"] = model, frozen_state(model)
            return real_train(model, *args, **kwargs)

        out, printed = root / f"{bits}bit", io.StringIO()
        with pytest.MonkeyPatch.context() as patch, contextlib.redirect_stdout(printed):
            patch.setattr(train_lora, "train", catching)
            argv = FLAGS + [f"--load-in-{bits}bit", "--output-dir", str(out)]
            assert run_cli(train_lora.main, argv + (["--merge"] if bits == 4 else [])) == 0
        found[bits] = (out, caught["model"].eval(), caught["before"], printed.getvalue())
    return found


def records(out, kind="train"):
    lines = (out / "r8" / "train_log.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["type"] == kind]


@pytest.mark.parametrize("bits", [4, 8])
def test_the_base_is_quantised_frozen_and_unchanged_while_the_adapter_learns(runs, bits):
    out, model, before, _ = runs[bits]
    # Every projection of the two blocks is quantised; the output layer is not.
    quantised = [n for n, m in model.named_modules() if isinstance(m, QUANTISED[bits])]
    assert len(quantised) == 2 * 7 and all(".layers." in n for n in quantised)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    after = frozen_state(model)
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before), "the frozen base changed"
    losses = [r["loss"] for r in records(out)]
    assert len(losses) == STEPS
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5  # the adapter learned something
    # Evaluations at steps 10 and 20 did not stop the base from training after them.
    evals = [r["loss"] for r in records(out, "eval")]
    before_training = json.loads((out / "r8" / "metrics.json").read_text())["eval_loss_before"]
    assert len(evals) == 3 and evals[-1] < before_training - 0.2


@pytest.mark.parametrize("bits,at_most", [(4, 1 / 5), (8, 1 / 3)])
def test_quantised_layers_take_a_fraction_of_their_fp32_memory(runs, bits, at_most):
    out, model, _, _ = runs[bits]
    fp32 = AutoModelForCausalLM.from_pretrained(out / "base_model", dtype=torch.float32)
    fp32.requires_grad_(False)  # a base, as LoRA holds it
    quantised = full = 0
    for name, module in model.named_modules():
        if isinstance(module, QUANTISED[bits]):
            quantised += quantize.weight_bytes(module)
            plain = name.removeprefix("base_model.model.").removesuffix(".base_layer")
            full += quantize.weight_bytes(fp32.get_submodule(plain))
    # NF4: 0.5 byte per weight + an 8-bit scale per 64 (about 1/7.8 of fp32);
    # int8: 1 byte + an fp32 scale per row (1/4 and a little).
    assert 0 < quantised < at_most * full, (quantised, full)
    metrics = json.loads((out / "r8" / "metrics.json").read_text())
    assert metrics["base_mib_per_device"] == pytest.approx(
        quantize.weight_bytes(model) / 2**20)


@pytest.mark.parametrize("bits", [4, 8])
def test_the_adapter_loads_onto_the_unquantised_base(runs, bits):
    """Logits of the fp32 base + the saved adapter against the quantised model that trained it.

    They differ by the quantisation of the frozen weights alone, an error that grows with
    the activations it multiplies, so it is measured relative to the spread of the logits:
    the base's own error is the largest deviation of the quantised base's logits from the
    fp32 base's, over the standard deviation of the latter. The adapted pair may deviate
    by at most twice that, in units of its own spread; the adapter itself moves the
    logits many times more, so an adapter that failed to load would not pass.
    """
    out, model, _, _ = runs[bits]
    rows = [{"input_ids": list(range(3, 3 + n)), "labels": list(range(3, 3 + n))}
            for n in (12, 20, 7)]
    batch = pad_batch(rows, 0)
    fp32 = AutoModelForCausalLM.from_pretrained(out / "base_model", dtype=torch.float32).eval()
    with torch.no_grad():
        base = fp32(**batch).logits
        with model.disable_adapter():
            base_error = (model(**batch).logits - base).abs().max() / base.std()
        trained = model(**batch).logits
        reloaded = PeftModel.from_pretrained(fp32, out / "r8" / "adapter").eval()(**batch).logits
    gap = (reloaded - trained).abs().max()
    assert 0 < base_error and gap / reloaded.std() <= 2 * base_error, (gap, base_error)
    assert (reloaded - base).abs().max() > 10 * gap


def test_merge_goes_into_the_unquantised_base_in_half_precision(runs):
    out, _, _, printed = runs[4]
    assert "r8: merging the adapter into the unquantised base" in printed
    assert "loaded in bfloat16, not into its 4-bit weights" in printed
    merged = load_file(out / "r8" / "merged" / "model.safetensors")
    assert {t.dtype for t in merged.values()} == {torch.bfloat16}
    config = json.loads((out / "r8" / "merged" / "config.json").read_text())
    assert "quantization_config" not in config
    fp32 = AutoModelForCausalLM.from_pretrained(out / "base_model", dtype=torch.float32)
    want = PeftModel.from_pretrained(fp32, out / "r8" / "adapter").merge_and_unload().state_dict()
    for name, tensor in want.items():
        # The fp32 merge, up to bf16's rounding (8 bits of mantissa) of base and sum:
        # within 2 units of the last place of the tensor's largest weight.
        tolerance = tensor.abs().max().item() * 2 ** -7
        torch.testing.assert_close(merged[name].float(), tensor, rtol=0, atol=tolerance)


def test_cpu_runs_log_their_peak_rss(runs):
    out, _, _, _ = runs[8]
    peaks = [r["peak_rss_mib"] for r in records(out)]
    assert len(peaks) == STEPS and peaks == sorted(peaks) and peaks[0] > 100  # MiB, rising


# --- refusals: one line, exit 2, nothing written ------------------------------------------

def refused(argv, out, capsys) -> str:
    assert run_cli(train_lora.main, argv + ["--output-dir", str(out)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and " — " in lines[0], lines
    assert not out.exists()
    return lines[0]


@pytest.mark.parametrize("version,says", [(None, "needs the bitsandbytes package, which is not "
                                                 "installed"),
                                          ("0.45.5", "needs bitsandbytes >= 0.47, and 0.45.5 is "
                                                     "installed")])
def test_missing_or_old_bitsandbytes_names_what_to_install(version, says, tmp_path, capsys,
                                                           monkeypatch):
    monkeypatch.setattr(quantize, "installed_bitsandbytes", lambda: version)
    line = refused(["--demo", "--load-in-8bit"], tmp_path / "run", capsys)
    assert f"--load-in-8bit {says} — pip install -e '.[qlora]'" in line


@pytest.fixture(scope="module")
def saved_bases(tmp_path_factory):
    """The demo's tiny Llama saved three ways: plain, quantised by bitsandbytes to 4 bits,
    and marked as quantised by GPTQ (what the checks read is its config)."""
    from transformers import BitsAndBytesConfig

    from core.demo import bpe_tokenizer, data_file, tiny_llama_config
    root = tmp_path_factory.mktemp("bases")
    rows = [json.loads(line) for line in open(data_file("qa.jsonl"))]
    tokenizer = bpe_tokenizer([v for r in rows for v in r.values() if v], max_length=128)
    torch.manual_seed(0)
    plain = AutoModelForCausalLM.from_config(tiny_llama_config(len(tokenizer), 128))
    plain.save_pretrained(root / "plain")
    four_bit = AutoModelForCausalLM.from_pretrained(
        root / "plain", quantization_config=BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16),
        device_map={"": "cpu"})
    four_bit.save_pretrained(root / "bnb-4bit")
    plain.save_pretrained(root / "gptq")
    config = json.loads((root / "gptq" / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "gptq", "bits": 4, "group_size": 128}
    (root / "gptq" / "config.json").write_text(json.dumps(config))
    for name in ("bnb-4bit", "gptq"):
        tokenizer.save_pretrained(root / name)
    return root


@pytest.mark.parametrize("base,flags,says", [
    ("gptq", [], "is already quantised (gptq)"),
    ("gptq", ["--load-in-4bit"], "is already quantised (gptq)"),
    ("bnb-4bit", [], "is saved quantised to 4 bits by bitsandbytes — pass --load-in-4bit"),
    ("bnb-4bit", ["--load-in-8bit"], "is saved quantised to 4 bits by bitsandbytes"),
    ("bnb-4bit", ["--load-in-4bit", "--merge"], "--merge needs the unquantised base"),
])
def test_a_base_quantised_elsewhere_is_refused(saved_bases, base, flags, says, tmp_path, capsys):
    argv = ["--demo", "--model", str(saved_bases / base), "--max-length", "128", *flags]
    assert says in refused(argv, tmp_path / "run", capsys)


def test_a_base_saved_in_4_bits_trains_in_the_runs_precision(saved_bases, tmp_path,
                                                             monkeypatch):
    caught = {}
    real_train = train_lora.train

    def catching(model, *args, **kwargs):
        caught["dtypes"] = {m.compute_dtype for m in model.modules()
                            if isinstance(m, bnb.nn.Linear4bit)}
        return real_train(model, *args, **kwargs)

    monkeypatch.setattr(train_lora, "train", catching)
    argv = ["--demo", "--model", str(saved_bases / "bnb-4bit"), "--max-length", "128",
            "--load-in-4bit", "--max-steps", "2", "--lora-r", "4", "--output-dir",
            str(tmp_path / "run")]
    assert run_cli(train_lora.main, argv) == 0
    assert caught["dtypes"] == {torch.float32}  # saved for bf16; this run computes in fp32


def test_a_sweep_resumes_on_the_base_it_trained_on(runs, tmp_path, capsys):
    out = runs[4][0]
    before = sorted(p.stat().st_mtime_ns for p in out.rglob("*"))
    assert run_cli(train_lora.main, FLAGS + ["--output-dir", str(out), "--resume-from",
                                             "latest"]) == 2
    line = capsys.readouterr().err.strip()
    assert "trained on a 4-bit base, and this run asks for an unquantised one" in line
    assert line.endswith("resume with --load-in-4bit")
    assert sorted(p.stat().st_mtime_ns for p in out.rglob("*")) == before
