"""Data preparation at scale: peak memory and throughput of corpus + tokenizer + lm task.

    python bench/bench_data_scale.py [--sizes 30 100 300 1000] [--workers 2] [--old DIR]

Builds corpora of real Python (the .py files of this interpreter's site-packages and standard
library, then of the packages EXTRA_PACKAGES names, installed with pip into EXTRA_DIR when a size
asks for more than this interpreter holds), copied into a temporary directory up to each size in
MB (files over 1 MB left out). Each is prepared in a fresh child process as a run prepares it:
load the corpus, train a CodeTokenizer (min_freq 10) on the train split, build the lm task's
token files. Each child reports its peak RSS (VmHWM), the largest peak RSS of its worker
processes (shared pages counted in both) and its time; MB/s is the corpus's bytes over that time.
``--old DIR`` runs the same in a checkout of another commit (``git worktree add DIR COMMIT``) in
turn with this one, on the same corpus, so the ratio holds on a busy machine; both builds' token
files are compared byte for byte.
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = """
import inspect, json, resource, sys, time
sys.path.insert(0, sys.argv[1])
import dataset
from codelm.data.config import DataConfig
from tokenizer import CodeTokenizer
start = time.perf_counter()
cfg = DataConfig(sources=[sys.argv[2]], cache_dir=sys.argv[3], num_workers=int(sys.argv[4]),
                 progress=False)
texts = dataset.prepare(cfg, None)
# A commit whose CodeTokenizer.train counts pieces in one process takes no num_workers.
workers = {"num_workers": cfg.num_workers} if "num_workers" in inspect.signature(
    CodeTokenizer.train).parameters else {}
tok = CodeTokenizer.train(texts.train, min_freq=10, **workers)
data = dataset.prepare(cfg, tok)
took = time.perf_counter() - start
hwm = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM"))
workers_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # the largest worker's
print(json.dumps({"seconds": took, "peak_kb": hwm, "workers_kb": workers_kb,
                  "cache": str(data.cache_path),
                  "files": data.stats["corpus"]["read"]["files"]}))
"""


# Large pure-Python packages (cloud SDKs, automation, libraries), pinned: installed only as
# corpus text, never imported.
EXTRA_PACKAGES = ["ansible==12.3.0", "oci==2.189.0", "pulumi-aws==7.51.1", "pulumi-gcp==10.2.0",
                  "kubernetes==37.0.2", "google-cloud-aiplatform==2.7.0", "sympy==1.14.0",
                  "plotly==7.1.0", "homeassistant==2024.3.3", "django==5.2.19",
                  "azure-mgmt-network==33.1.0"]
EXTRA_DIR = Path.home() / ".cache" / "codelm" / "bench-python"


def python_files(extra: bool) -> list[Path]:
    """Every .py file of site-packages and the standard library, then (``extra``) of
    EXTRA_DIR's packages, in a fixed order."""
    roots = [Path(sysconfig.get_paths()["purelib"]), Path(sysconfig.get_paths()["stdlib"])]
    files = []
    for root in roots + ([EXTRA_DIR] if extra else []):
        files += sorted(p for p in root.rglob("*.py") if p.is_file() and not p.is_symlink())
    return files


def install_extra_packages() -> None:
    """pip install EXTRA_PACKAGES (no dependencies) into EXTRA_DIR, once."""
    done = EXTRA_DIR / "installed.txt"
    if done.is_file() and done.read_text().split() == EXTRA_PACKAGES:
        return
    print(f"installing {len(EXTRA_PACKAGES)} packages into {EXTRA_DIR} as corpus text", flush=True)
    shutil.rmtree(EXTRA_DIR, ignore_errors=True)
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps",
                    "--no-compile", "--target", str(EXTRA_DIR), *EXTRA_PACKAGES], check=True)
    done.write_text("\n".join(EXTRA_PACKAGES))


def build_corpus(directory: Path, megabytes: int, files: list[Path]) -> int:
    """Copy ``files`` in order into ``directory`` (each under a numbered folder: names stay
    unique) until ``megabytes`` MB; the bytes copied."""
    directory.mkdir(parents=True)
    total = 0
    for i, src in enumerate(files):
        if total >= megabytes * 1_000_000:
            break
        size = src.stat().st_size
        if size > 1_000_000:
            continue
        target = directory / f"{i // 1000:04d}" / f"{i:07d}_{src.name}"
        target.parent.mkdir(exist_ok=True)
        shutil.copyfile(src, target)
        total += size
    return total


def run(code_root: Path, corpus: Path, cache: Path, workers: int) -> dict:
    import json

    out = subprocess.run([sys.executable, "-c", CHILD, str(code_root), str(corpus), str(cache),
                          str(workers)], capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"{code_root} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def token_digest(cache: Path) -> str:
    h = hashlib.sha256()
    for split in ("train", "val", "test"):
        h.update((cache / f"{split}.bin").read_bytes())
    return h.hexdigest()[:16]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[30, 100, 300, 1000],
                        help="corpus sizes in MB (default: 30 100 300 1000)")
    parser.add_argument("--workers", type=int, default=2, help="worker processes (default: 2)")
    parser.add_argument("--old", type=Path, help="a checkout of another commit, run in turn (default: none)")
    args = parser.parse_args()
    files = python_files(extra=False)
    available = sum(p.stat().st_size for p in files if p.stat().st_size <= 1_000_000) / 1e6
    if max(args.sizes) > available:
        install_extra_packages()
        files = python_files(extra=True)
        available = sum(p.stat().st_size for p in files if p.stat().st_size <= 1_000_000) / 1e6
    print(f"{len(files)} .py files, {available:.0f} MB available; {args.workers} workers")
    print(f"{'MB':>6} {'code':>5} {'peak RSS GB':>12} {'worker GB':>10} {'seconds':>8} "
          f"{'MB/s':>6} {'tokens':>17}")
    for megabytes in args.sizes:
        with tempfile.TemporaryDirectory(prefix="codelm-scale-") as tmp:
            corpus = Path(tmp) / "corpus"
            size = build_corpus(corpus, megabytes, files) / 1e6
            if size < megabytes * 0.95:
                print(f"only {size:.0f} MB of Python here: {megabytes} MB skipped")
                continue
            roots = [("new", ROOT)] + ([("old", args.old)] if args.old else [])
            for name, code_root in roots:
                cache = Path(tmp) / f"cache-{name}"
                result = run(code_root, corpus, cache, args.workers)
                print(f"{size:>6.0f} {name:>5} {result['peak_kb'] / 1e6:>12.2f} "
                      f"{result['workers_kb'] / 1e6:>10.2f} "
                      f"{result['seconds']:>8.1f} {size / result['seconds']:>6.2f} "
                      f"{token_digest(Path(result['cache'])):>17}", flush=True)
                shutil.rmtree(cache)


if __name__ == "__main__":
    main()
