"""One load measurement for `bench_model.py --only load`, in a fresh process that does only what
a user's script does: import the library, load the checkpoint in bf16, run one forward pass (so
every weight page is touched), then print load time and peak RSS as JSON. Kept apart from
bench_model.py so that the benchmark's own imports and code are not counted as the loader's.

    python bench/load_child.py codelm|transformers CHECKPOINT_DIR THREADS
"""

import json
import sys
import time
from pathlib import Path

import torch


def _status_mib(field: str) -> float:
    line = next(ln for ln in Path("/proc/self/status").read_text().splitlines()
                if ln.startswith(field + ":"))
    return int(line.split()[1]) / 1024


def main() -> None:
    if len(sys.argv) != 4 or sys.argv[1] not in ("codelm", "transformers"):
        sys.exit(__doc__)
    lib, path, threads = sys.argv[1], sys.argv[2], int(sys.argv[3])
    torch.set_num_threads(threads)
    if lib == "codelm":
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        from codelm.models import pretrained

        load = pretrained.load
    else:
        import transformers

        transformers.logging.set_verbosity_error()
        load = transformers.AutoModelForCausalLM.from_pretrained
    base = _status_mib("VmRSS")
    t0 = time.perf_counter()
    model = load(path, dtype=torch.bfloat16)
    load_s = time.perf_counter() - t0
    with torch.no_grad():
        out = model(torch.tensor([[1, 2, 3, 4]]))
    # VmHWM, not ru_maxrss (Linux carries the parent's peak into ru_maxrss across fork + exec),
    # read before checking the output, whose fp32 copy would count otherwise.
    peak = _status_mib("VmHWM")
    logits = out if isinstance(out, torch.Tensor) else out.logits
    assert torch.isfinite(logits.float()).all()
    print(json.dumps({"load_s": load_s, "peak_mib": peak, "base_mib": base}))


if __name__ == "__main__":
    main()
