"""`--compile`: torch.compile of a model's repeated blocks, in place.

A transformer is mostly one block class repeated (26 decoder layers in OpenLLaMA-3b).
Compiling each block in place, rather than the whole model, lets the compiler reuse
one graph for every layer (the parameters are its inputs, not constants), so a deep
model compiles in about the time of one layer, and the compiled code fuses what eager
PyTorch launches one kernel at a time (norms, rotary embeddings, activations, the
adapters' dropout and additions). What is not in a block (embeddings, the head, the
loss) stays eager. In place, so parameter names, checkpoints and saving are unchanged.
"""

import torch


def repeated_blocks(model: torch.nn.Module) -> list[torch.nn.ModuleList]:
    """The outermost ModuleLists holding two or more modules of one class."""
    found: dict[str, torch.nn.ModuleList] = {}
    for name, module in model.named_modules():
        if (isinstance(module, torch.nn.ModuleList) and len(module) > 1
                and len({type(m) for m in module}) == 1
                and not any(name.startswith(f"{outer}.") for outer in found)):
            found[name] = module
    return list(found.values())


def compile_model(model: torch.nn.Module) -> None:
    """Each repeated block compiled in place; a model without one, compiled whole.

    Graphs compiled for an earlier model in this process are dropped first. A sweep
    trains one model after another, and transformers' blocks of every class run through
    one function (the gradient-checkpointing wrapper), whose graphs dynamo keeps
    together up to its recompile limit of 8: the default sweep's ranks (a graph each
    for training and evaluation, with other weight shapes at each rank) reached it
    during r=16, and the rest of the sweep ran eagerly.
    """
    torch.compiler.reset()
    blocks = repeated_blocks(model)
    if not blocks:
        model.compile()
        return
    inputs_need_grad(model)
    for layers in blocks:
        for layer in layers:
            layer.compile(dynamic=True)


def inputs_need_grad(model: torch.nn.Module) -> None:
    """Frozen embeddings (LoRA) give the first block an input that needs no gradient and
    every other block one that does: the compiler guards on that, so training would
    compile the block twice, each time the whole forward and backward (on a GPU, most of
    a minute for a 3B model's block). Making the embeddings' output need a gradient lets
    one graph serve every block, for the price of the first block's input gradient
    (about 0.5 % of a 3B LoRA step's arithmetic), computed and dropped.
    """
    get = getattr(model, "get_input_embeddings", None)
    try:
        embeddings = get() if get else None
    except NotImplementedError:  # transformers' answer for a model without one
        return
    if embeddings is None or any(p.requires_grad for p in embeddings.parameters()):
        return
    embeddings.register_forward_hook(_output_needs_grad)


def _output_needs_grad(module, args, output):
    """The output plus a zero that needs a gradient: the same values, not a leaf (some
    models scale their embeddings in place, which a leaf needing a gradient forbids)."""
    if not (torch.is_grad_enabled() and isinstance(output, torch.Tensor)) or \
            output.requires_grad:
        return output  # evaluation's graph runs without gradients anyway
    return output + output.new_zeros((), requires_grad=True)
