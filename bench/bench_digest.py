"""What a checkpoint's manifest costs: the BLAKE3 digest of every file, on the Llama-3.2-1B-shaped
bf16 checkpoint (1.24B parameters, 2.3 GiB) that `bench_model.py --only load` uses.

Save: `safetensors.torch.save_file` of the weights, then `process.write_manifest` (the files are
in the page cache, as right after a save). Load: `safetensors.torch.load_file` and a copy of
every tensor (what resume's load_state_dict does: every byte read), then
`process.manifest_problem` (as resume verifies first). Also a plain sequential read of the file,
the floor for any verification. Best of --repeats.

    python bench/bench_digest.py [--ckpt-dir DIR] [--repeats 3]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from bench_model import make_checkpoint  # noqa: E402

from codelm.runtime import process  # noqa: E402


def best_of(repeats: int, fn) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def read_all(path: Path) -> None:
    with open(path, "rb") as f:
        while f.read(1 << 24):
            pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt-dir", default="/tmp/codelm_bench/llama-3.2-1b-bf16",
                        help="where the random checkpoint is written once and reused "
                        "(default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=3,
                        help="runs of each; the best counts (default: %(default)s)")
    args = parser.parse_args()
    source = Path(args.ckpt_dir)
    make_checkpoint(source)
    weights = load_file(source / "model.safetensors")
    size = (source / "model.safetensors").stat().st_size
    out = source.parent / "digest-bench"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    target = out / "model.safetensors"
    save = best_of(args.repeats, lambda: save_file(weights, target))
    manifest = best_of(args.repeats, lambda: process.write_manifest(out))
    load = best_of(args.repeats, lambda: [t.clone() for t in load_file(target).values()])
    verify = best_of(args.repeats, lambda: process.manifest_problem(out))
    read = best_of(args.repeats, lambda: read_all(target))
    shutil.rmtree(out)
    gib = size / 2**30
    print(f"file {gib:.2f} GiB; save {save:.2f} s, manifest {manifest:.2f} s "
          f"(**{manifest / save:.2f}x** the save); load {load:.2f} s, verify {verify:.2f} s "
          f"(**{verify / load:.2f}x** the load); plain read {read:.2f} s ({gib / read:.1f} GiB/s), "
          f"digest {gib / verify:.1f} GiB/s")


if __name__ == "__main__":
    main()
