"""What verifying a checkpoint costs at the sizes that matter: hashing every byte once.

    python -m bench.checkpoint_verify              # --repeats 3 --dir /tmp

Each case is a checkpoint directory of random bytes in the files and sizes a real run
writes (fp32 weights, AdamW's two moments, the RNG states and the counters), with its
manifest. The time is `core.manifest.problem` on a fresh directory: the check every
resume makes. The files were just written, so they are read from the page cache; after
a reboot, reading them from the disk comes on top (at the disk's speed).
"""

import argparse
import datetime
import json
import platform
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from core import manifest

# Trainable weights, fp32. LoRA r = 8 on all 7 projections of OpenLLaMA-3b's 26 blocks
# (hidden 3200, intermediate 8640); DistilBERT-base with a 2-class head, every weight.
CASES = {"LoRA r=8 on OpenLLaMA-3b": 26 * (4 * 8 * (3200 + 3200) + 3 * 8 * (3200 + 8640)),
         "DistilBERT-base, full fine-tuning": 66_955_010}


def write_checkpoint(directory: Path, weights: int, rng: np.random.Generator) -> int:
    """A checkpoint of `weights` fp32 weights; returns its size in bytes."""
    directory.mkdir()
    sizes = {"model.pt": 4 * weights, "optimizer.pt": 8 * weights, "rng_rank0.pt": 5_000}
    for name, size in sizes.items():
        (directory / name).write_bytes(rng.bytes(size))
    (directory / "trainer_state.json").write_text(json.dumps({"step": 1000}))
    (directory / manifest.NAME).write_text(json.dumps(manifest.describe(directory)))
    return sum(p.stat().st_size for p in directory.iterdir())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dir", default=tempfile.gettempdir(), help="where to write them")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    print(f"{datetime.date.today()}, {platform.processor() or platform.machine()}, "
          f"best of {args.repeats}")
    for name, weights in CASES.items():
        times = []
        for _ in range(args.repeats):
            directory = Path(tempfile.mkdtemp(dir=args.dir)) / "step-001000"
            size = write_checkpoint(directory, weights, rng)
            start = time.perf_counter()
            assert manifest.problem(directory) is None
            times.append(time.perf_counter() - start)
            shutil.rmtree(directory.parent)
        print(f"{name}: {size / 1e6:.0f} MB verified in {min(times):.2f} s "
              f"({size / 1e9 / min(times):.2f} GB/s)")


if __name__ == "__main__":
    main()
