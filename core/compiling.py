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
    """Each repeated block compiled in place; a model without one, compiled whole."""
    blocks = repeated_blocks(model)
    if not blocks:
        model.compile()
        return
    for layers in blocks:
        for layer in layers:
            layer.compile(dynamic=True)
