"""Kill the stages that write big outputs at random points; check that reruns resume and match.

On a small random LLaMA-style model in a temporary folder: an uninterrupted run of every stage
up to export gives the reference outputs. Then, per trial, `prunekit stage <stage>` is started
and sent SIGKILL after a random delay, uniform over the time the uninterrupted run spent there
(hessians and prune: from their layer loop's progress bar to its end, plus the model's save
for prune; quantize and export: from their first line on stderr to their end), and the
checks are:

- hessians: every layer the killed run had finished (its `complete` attribute written) is kept
  by the rerun — its files keep their inode and mtime, so it was not recomputed — and the store
  after the rerun is bit-identical to the reference (every array and attribute);
- prune, quantize, export: after the kill the stage's folder (`data/pruned/<model>`,
  `data/compressed/<model>`, `data/export/<model>`) is either absent or complete and equal to
  the reference (never a partial one); after the rerun it is byte-identical to the reference
  and no `<folder>.tmp` is left beside it.

    python benchmarks/kill_resume.py --trials 5
"""
from __future__ import annotations

import argparse
import hashlib
import json
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

MODEL = dict(model_type="llama", vocab_size=512, hidden_size=256, intermediate_size=768, num_hidden_layers=8,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, bos_token_id=1,
             eos_token_id=2, pad_token_id=0)
STORE, PRUNED = "data/hessians/kr__c4.zarr", "data/pruned/kr"
COMPRESSED, EXPORTED = "data/compressed/kr", "data/export/kr"


def stage(cwd: Path, name: str, env: dict, kill_after: float | None = None, marker: str = "",
          end_marker: str | None = "100%|") -> tuple[int, float, float]:
    """Run `prunekit stage <name>` in cwd; SIGKILL it kill_after seconds after `marker` first
    shows on its stderr (the stage's progress bar: its layer loop started).

    Returns (rc, loop start s, loop end s): when `marker` and then `end_marker` first showed
    (end_marker None: when the stage ended).
    """
    start = time.monotonic()
    seen, done = None, None
    with tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen([sys.executable, "-m", "flows", "stage", name], cwd=cwd, env=env,
                                stdout=subprocess.DEVNULL, stderr=err, text=True)
        while proc.poll() is None:
            time.sleep(0.02)
            if marker and done is None:
                err.seek(0)
                text = err.read()
                seen = seen or (time.monotonic() if marker in text else None)
                done = (time.monotonic() if seen and end_marker is not None and end_marker in text[text.index(marker):]
                        else None)
            if kill_after is not None and seen is not None and time.monotonic() - seen > kill_after:
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                return -signal.SIGKILL, seen - start, time.monotonic() - start
        err.seek(0)
        if proc.returncode != 0:
            raise RuntimeError(f"stage {name} failed:\n{err.read()[-3000:]}")
    end = time.monotonic()
    return 0, (seen or end) - start, (done or end) - start


def files_state(folder: Path) -> dict[str, tuple[int, int]]:
    """(inode, mtime_ns) of every file under folder: a rewrite (atomic rename) changes both."""
    return {str(p.relative_to(folder)): (p.stat().st_ino, p.stat().st_mtime_ns) for p in sorted(folder.rglob("*"))
            if p.is_file()}


def folder_digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def store_content(path: Path) -> dict:
    """Every layer's attributes and array bytes (the store's content, not its file layout)."""
    import zarr

    root = zarr.open_group(path, mode="r")
    out = {"attrs": dict(root.attrs)}
    for name in sorted(root.group_keys()):
        group = root[name]
        out[name] = {"attrs": dict(group.attrs),
                     **{k: hashlib.sha256(group[k][...].tobytes()).hexdigest() for k in sorted(group.array_keys())}}
    return out


def finished_layers(path: Path) -> list[int]:
    from prunekit.storage.hessian_store import HessianStore

    if not path.exists():
        return []
    import zarr

    try:
        store = HessianStore(path, zarr.open_group(path, mode="r"))
        n = store.attrs["n_layers"]
    except Exception:  # killed before the root attributes were written
        return []
    return [i for i in range(n) if store.has_layer(i)]


def setup(workdir: Path, env: dict) -> None:
    """A small random model, its calibration windows and a uniform 70% schedule."""
    import torch
    import yaml
    from transformers import AutoConfig, AutoModelForCausalLM

    sys.path.insert(0, str(ROOT / "tests"))
    from tiny import train_tokenizer

    torch.manual_seed(0)
    config = AutoConfig.for_model(**MODEL)
    AutoModelForCausalLM.from_config(config).save_pretrained(workdir / "source")
    train_tokenizer(workdir / "source")
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["model"] = {"name": "kr", "source": str(workdir / "source")}
    params["calibration"].update(nsamples=32, seqlen=128)
    params["runtime"] = {"device": "cpu"}
    (workdir / "params.yaml").write_text(yaml.safe_dump(params))
    for name in ("prepare_model", "calibrate"):
        stage(workdir, name, env)
    keys = [f"{i}.{n}" for i in range(MODEL["num_hidden_layers"]) for n in
            ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
             "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")]
    (workdir / "data/schedule").mkdir(parents=True, exist_ok=True)
    (workdir / "data/schedule/kr.json").write_text(json.dumps({"target": 0.7, "sparsity": {k: 0.7 for k in keys}}))


def hessian_trial(workdir: Path, env: dict, delay: float, reference: dict) -> dict:
    shutil.rmtree(workdir / STORE, ignore_errors=True)
    rc, *_ = stage(workdir, "hessians", env, kill_after=delay, marker="hessians:")
    done = finished_layers(workdir / STORE)
    before = {i: files_state(workdir / STORE / f"layer_{i:03d}") for i in done}
    stage(workdir, "hessians", env)
    kept = [i for i in done if files_state(workdir / STORE / f"layer_{i:03d}") == before[i]]
    return {"stage": "hessians", "delay_s": round(delay, 2), "killed": rc != 0, "finished_at_kill": done,
            "kept_by_rerun": kept == done, "identical": store_content(workdir / STORE) == reference}


# The stages that write a model folder: (stage, its output folder, the stderr marker after
# which the kill delay counts, the marker that ends the time the delays are drawn from). Prune:
# its layer loop's progress bar, to its end plus the save; the others: their first stderr line
# (imports done), to their end.
FOLDER_STAGES = (("prune", PRUNED, "prune (", "100%|"), ("quantize", COMPRESSED, "\n", None),
                 ("export", EXPORTED, "\n", None))


def folder_trial(workdir: Path, env: dict, name: str, out: str, marker: str, delay: float, reference: dict,
                 keep_previous: bool) -> dict:
    """Kill stage `name` `delay` s after `marker`; its folder must then be absent or complete, and
    after a rerun byte-identical to the uninterrupted run's."""
    shutil.rmtree(workdir / out, ignore_errors=True)
    if keep_previous:  # a finished earlier run is being replaced when the kill comes
        shutil.copytree(workdir / "reference" / name, workdir / out)
    rc, *_ = stage(workdir, name, env, kill_after=delay, marker=marker)
    after_kill = folder_digest(workdir / out) if (workdir / out).exists() else None
    stage(workdir, name, env)
    return {"stage": name, "delay_s": round(delay, 2), "killed": rc != 0, "previous_output": keep_previous,
            "after_kill": "absent" if after_kill is None else ("complete" if after_kill == reference else "PARTIAL"),
            "identical": folder_digest(workdir / out) == reference,
            "leftovers": sorted(p.name for p in (workdir / out).parent.iterdir() if p.name.endswith(".tmp"))}


def run_trials(workdir: Path, env: dict, trials: int | dict[str, int], seed: int = 0) -> list[dict]:
    """Reference runs, then killed-and-rerun trials of hessians and each of FOLDER_STAGES:
    `trials` of each, or trials[stage] (0 where a stage is not named); one dict per trial."""
    rng = random.Random(seed)
    count = trials if isinstance(trials, dict) else dict.fromkeys(("hessians", *(f[0] for f in FOLDER_STAGES)), trials)
    setup(workdir, env)
    _, start, end = stage(workdir, "hessians", env, marker="hessians:")
    t_hessians = end - start  # the layer loop
    reference_store = store_content(workdir / STORE)
    times, references = {}, {}
    for name, out, marker, end_marker in FOLDER_STAGES:
        _, start, end = stage(workdir, name, env, marker=marker, end_marker=end_marker)
        times[name] = end - start + (1.0 if end_marker else 0.0)  # prune: its loop and the save after it
        references[name] = folder_digest(workdir / out)
        shutil.copytree(workdir / out, workdir / "reference" / name)
    # Delays: uniform over the time the uninterrupted run spent in its layer loop (and save).
    results = [hessian_trial(workdir, env, rng.uniform(0, t_hessians), reference_store)
               for _ in range(count.get("hessians", 0))]
    for name, out, marker, _ in FOLDER_STAGES:
        results += [folder_trial(workdir, env, name, out, marker, rng.uniform(0, times[name]), references[name],
                                 keep_previous=k % 2 == 0) for k in range(count.get(name, 0))]
    return results


def ok(result: dict) -> bool:
    if result["stage"] == "hessians":
        return result["kept_by_rerun"] and result["identical"]
    return result["after_kill"] != "PARTIAL" and result["identical"] and not result["leftovers"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    from flows.server import offline_env, prefect_server

    with tempfile.TemporaryDirectory() as tmp, prefect_server() as url:
        env = dict(offline_env(), PREFECT_API_URL=url, PYTHONPATH=str(ROOT))
        results = run_trials(Path(tmp), env, args.trials, args.seed)
    for r in results:
        print(json.dumps(r), "ok" if ok(r) else "FAILED")
    killed = sum(r["killed"] for r in results)
    print(f"{sum(map(ok, results))}/{len(results)} trials ok, {killed} of them killed mid-run")
    return 0 if all(map(ok, results)) else 1


if __name__ == "__main__":
    sys.exit(main())
