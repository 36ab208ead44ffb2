"""Every random generator a process draws from, as a flat dict of tensors.

Python's and NumPy's generators report their state as tuples holding ints, floats and
a NumPy array; saved as they are, only a full unpickler could read them back, and a
full unpickler runs whatever code a file names. As tensors they load with
`torch.load(..., weights_only=True)`, which builds tensors and plain containers only.
"""

import random

import numpy as np
import torch


def state() -> dict[str, torch.Tensor]:
    """This process's generators. On CUDA only the current device's: each rank owns one
    GPU, and asking for every device's state would create a context on all of them."""
    version, internal, gauss_next = random.getstate()
    _, key, pos, has_gauss, cached_gaussian = np.random.get_state()  # MT19937, always
    saved = {"python_version": torch.tensor(version),
             "python": torch.tensor(internal, dtype=torch.int64),
             # gauss_next is a float or None: a tensor of one value or of none.
             "python_gauss_next": torch.tensor([] if gauss_next is None else [gauss_next],
                                               dtype=torch.float64),
             "numpy_key": torch.from_numpy(key.astype(np.int64)),
             "numpy_pos": torch.tensor(pos), "numpy_has_gauss": torch.tensor(has_gauss),
             "numpy_cached_gaussian": torch.tensor(cached_gaussian, dtype=torch.float64),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        saved["cuda"] = torch.cuda.get_rng_state()
    return saved


def restore(saved: dict[str, torch.Tensor]) -> None:
    gauss_next = saved["python_gauss_next"].tolist()
    random.setstate((int(saved["python_version"]), tuple(saved["python"].tolist()),
                     gauss_next[0] if gauss_next else None))
    np.random.set_state(("MT19937", saved["numpy_key"].numpy().astype(np.uint32),
                         int(saved["numpy_pos"]), int(saved["numpy_has_gauss"]),
                         float(saved["numpy_cached_gaussian"])))
    torch.set_rng_state(saved["torch"])
    if "cuda" in saved and torch.cuda.is_available():
        torch.cuda.set_rng_state(saved["cuda"])
