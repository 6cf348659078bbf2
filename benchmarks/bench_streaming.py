"""Peak memory and time per layer of layer streaming (prunekit/streaming.py) on OPT-shaped models.

For each size an OPT model is built from its config with random weights, saved sharded with
`save_pretrained` (fp16 by default, as the OPT checkpoints are published) under --root (never
the repository), then run through, each step in a fresh child process:

- floor: the interpreter with torch, transformers and prunekit imported (what any run pays);
- hessians, in memory: `load_model` + `collect_hessians` (the pipeline's default), the baseline;
- hessians, streamed: `StreamedModel` + `collect_hessians`;
- prune, streamed: sequential SparseGPT (uniform 70%), the pruned model written as shards.

Each child reports its own peak RSS (VmHWM of /proc/self/status: the high-water mark of its
own address space, counting touched pages of the memory-mapped safetensors files too; not
ru_maxrss, which on Linux carries over the parent's RSS through fork + exec) and its time per
decoder layer. The script prints, per
size, peak RSS against the size on disk and against the in-memory run, and across sizes how
peak RSS and time per layer grow compared with the model. Calibration: random token ids
(nsamples × seqlen); the numbers depend on memory traffic, not on the text.

    python benchmarks/bench_streaming.py                      # opt-350m and opt-1.3b shapes
    python benchmarks/bench_streaming.py --prune-layers 4     # the same, SparseGPT on 4 layers only
    python benchmarks/bench_streaming.py --sizes 1.3b-12l --prune-layers 4 --json reports/bench_streaming_depth.json
    python benchmarks/bench_streaming.py --sizes 125m --nsamples 4 --seqlen 128   # quick check
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# The published OPT shapes (facebook/opt-*): layers, hidden, ffn, heads, embedding projection.
SIZES = {
    "125m": dict(num_hidden_layers=12, hidden_size=768, ffn_dim=3072, num_attention_heads=12, word_embed_proj_dim=768),
    "350m": dict(num_hidden_layers=24, hidden_size=1024, ffn_dim=4096, num_attention_heads=16, word_embed_proj_dim=512,
                 do_layer_norm_before=False),
    "1.3b": dict(num_hidden_layers=24, hidden_size=2048, ffn_dim=8192, num_attention_heads=32, word_embed_proj_dim=2048),
    # opt-1.3b cut to 12 layers: same layer, half the depth (what streaming's peak should not see)
    "1.3b-12l": dict(num_hidden_layers=12, hidden_size=2048, ffn_dim=8192, num_attention_heads=32,
                     word_embed_proj_dim=2048),
    "2.7b": dict(num_hidden_layers=32, hidden_size=2560, ffn_dim=10240, num_attention_heads=32, word_embed_proj_dim=2560),
}
GiB = 1 << 30


def build(size: str, folder: Path, dtype: str) -> None:
    import torch
    from transformers import AutoModelForCausalLM, OPTConfig

    torch.manual_seed(0)
    config = OPTConfig(vocab_size=50272, max_position_embeddings=2048, **SIZES[size])
    model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
    model.save_pretrained(folder, max_shard_size="200MB")


TASKS = ("floor", "hessians_memory", "hessians_stream", "prune_stream")


def child(task: str, folder: Path, work: Path, nsamples: int, seqlen: int, prune_layers: int | None) -> dict:
    """One measured run; returns its timings (the parent adds the peak RSS it reads)."""
    import torch

    from prunekit.compression.hessians import collect_hessians
    from prunekit.compression.prune import prune_model
    from prunekit.config import PruneParams
    from prunekit.forward.sources import InMemoryModel, StreamedModel
    from prunekit.models import prunable_parameters
    from prunekit.storage.hessian_store import HessianStore

    if task == "floor":
        return {}
    device = torch.device("cpu")
    windows = torch.randint(4, 50272, (nsamples, seqlen), generator=torch.Generator().manual_seed(0))
    windows[:, 0] = 2  # OPT's BOS
    start = time.perf_counter()
    if task == "hessians_memory":
        source = InMemoryModel.load(folder, device)
    else:
        out = work / "pruned" if task == "prune_stream" else None
        source = StreamedModel(folder, device, out_dir=out)
        if task == "prune_stream" and prune_layers:  # the rest is saved as read (dense)
            del source.layers[prune_layers:]
    runner = source.runner(windows)
    setup = time.perf_counter() - start
    n_layers = len(runner)
    start = time.perf_counter()
    if task.startswith("hessians"):
        path = work / f"{task}.zarr"
        shutil.rmtree(path, ignore_errors=True)
        store = HessianStore.open_for_writing(path, "bench", "bench", n_layers, "float32")
        collect_hessians(source, runner, store, torch.float32)
    else:
        sparsity = dict.fromkeys(prunable_parameters(source.model, source.adapter), 0.7)
        prune_model(source, sparsity, PruneParams(sparsity=0.7), runner=runner)
    loop = time.perf_counter() - start
    start = time.perf_counter()
    if task == "prune_stream":
        source.save(extra={})
    save = time.perf_counter() - start
    return {"setup_s": setup, "loop_s": loop, "save_s": save, "n_layers": n_layers, "s_per_layer": loop / n_layers}


def measure(task: str, folder: Path, work: Path, args) -> dict:
    """Run `task` in a fresh interpreter; its peak RSS is its own ru_maxrss."""
    cmd = [sys.executable, __file__, "--child", task, "--model-dir", str(folder), "--work", str(work),
           "--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen)]
    if args.prune_layers:
        cmd += ["--prune-layers", str(args.prune_layers)]
    done = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=ROOT)
    result = json.loads(done.stdout.strip().splitlines()[-1])
    print(f"  {task:16s} peak RSS {result['peak_rss'] / GiB:6.2f} GiB"
          + (f", {result['s_per_layer']:6.2f} s/layer over {result['n_layers']} layers" if "s_per_layer" in result
             else ""), flush=True)
    return result


def peak_rss() -> int:
    """Bytes: the high-water mark of this process's resident set."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status (Linux only)")


def disk_size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=["350m", "1.3b"], choices=sorted(SIZES))
    parser.add_argument("--dtype", default="float16", choices=["float16", "float32"], help="dtype on disk")
    parser.add_argument("--nsamples", type=int, default=8)
    parser.add_argument("--seqlen", type=int, default=256)
    parser.add_argument("--root", type=Path, default=Path("/tmp/prunekit-bench-streaming"))
    parser.add_argument("--prune-layers", type=int, default=None,
                        help="prune only the first N layers (SparseGPT dominates the time; every layer of a "
                             "size costs the same, so N layers give its peak RSS and time per layer)")
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS,
                        help="runs to measure (default: all; the ratios need floor and both Hessian runs)")
    parser.add_argument("--json", type=Path, default=ROOT / "reports" / "bench_streaming.json")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--build", help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.build:
        build(args.build, args.model_dir, args.dtype)
        return
    if args.child:
        import logging
        logging.disable(logging.INFO)
        result = child(args.child, args.model_dir, args.work, args.nsamples, args.seqlen, args.prune_layers)
        result["peak_rss"] = peak_rss()
        print(json.dumps(result))
        return

    tasks = [t for t in TASKS if t in args.tasks]
    results = {}
    for size in args.sizes:
        folder = args.root / f"opt-{size}-{args.dtype}"
        if not (folder / "config.json").is_file():
            print(f"building opt-{size} ({args.dtype}) in {folder} ...", flush=True)
            # in a child, so that this process stays small while the children are measured
            subprocess.run([sys.executable, __file__, "--build", size, "--model-dir", str(folder), "--dtype", args.dtype],
                           check=True, cwd=ROOT)
        work = args.root / f"work-{size}"
        work.mkdir(parents=True, exist_ok=True)
        disk = disk_size(folder)
        print(f"opt-{size}: {disk / GiB:.2f} GiB on disk ({len(list(folder.glob('*.safetensors')))} shards), "
              f"calibration {args.nsamples} x {args.seqlen}", flush=True)
        runs = {task: measure(task, folder, work, args) for task in tasks}
        shutil.rmtree(work, ignore_errors=True)
        results[size] = {"disk_bytes": disk, "dtype_on_disk": args.dtype, "runs": runs}
        if set(TASKS) <= set(runs):
            peak = max(r["peak_rss"] for t, r in runs.items() if t.endswith("stream"))
            print(f"  streamed peak / size on disk = {peak / disk:.2f}; streamed / in-memory Hessians peak = "
                  f"{runs['hessians_stream']['peak_rss'] / runs['hessians_memory']['peak_rss']:.2f}; "
                  f"above the import floor: {(peak - runs['floor']['peak_rss']) / GiB:.2f} GiB", flush=True)
        for task in runs:
            print(f"  {task}: peak RSS / size on disk = {runs[task]['peak_rss'] / disk:.2f}", flush=True)

    if len(results) > 1 and set(TASKS) <= set(tasks):
        first, last = args.sizes[0], args.sizes[-1]
        a, b = results[first], results[last]
        print(f"\nfrom opt-{first} to opt-{last}: size on disk x{b['disk_bytes'] / a['disk_bytes']:.2f}")
        for task in tasks[1:]:
            ra, rb = a["runs"][task], b["runs"][task]
            floor_a, floor_b = a["runs"]["floor"]["peak_rss"], b["runs"]["floor"]["peak_rss"]
            print(f"  {task:16s} peak RSS x{rb['peak_rss'] / ra['peak_rss']:.2f} "
                  f"(above floor x{(rb['peak_rss'] - floor_b) / (ra['peak_rss'] - floor_a):.2f}), "
                  f"time per layer x{rb['s_per_layer'] / ra['s_per_layer']:.2f}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"calibration": [args.nsamples, args.seqlen], "prune_layers": args.prune_layers,
                                     "sizes": results}, indent=2) + "\n")
    print(f"\nwritten {args.json}")


if __name__ == "__main__":
    main()
