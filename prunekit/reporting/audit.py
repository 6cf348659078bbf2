"""Audit a run against a provenance record, with judgement.

Every artifact of the record gets one verdict:

- identical: every file has the recorded sha256;
- within tolerance: bytes differ, numbers agree within the tolerances below (what another CPU's
  floating-point order, or another thread count, gives);
- different: something differs beyond them (another parameter, another schedule, missing files);
- unverified: bytes differ and there is nothing to compare them with numerically (pass
  `against`, a folder holding the recorded run's files: a teammate's clone, or `dvc pull`).

Tolerances (`TOLERANCES`):

- metrics (reports/metrics/<model>.json, values kept in the record): the same protocol, and
  every perplexity inside the other run's 95% interval and the other's inside its own;
- params.yaml: the same parameters once parsed, `runtime` aside (where and how a run computes
  — device, streaming, task runner, shards — changes the floating-point order, not the method);
- files derived from the metrics (metrics.json, report.md, runs.csv, plots): the verdict of the
  metrics they come from;
- with `against`: zarr Hessians and saved tensors elementwise, max |a − b| / max |b| per
  tensor; pruned weights (the tensors with exact zeros) by the agreement of their zero masks
  and the relative RMS difference; numbers in parquet and JSON files by relative difference
  (hashes and fingerprints in them aside: they differ whenever the bytes do).

Exit status of `prunekit audit`: 0 all identical, 1 within tolerance, 3 different, 4 unverified
(nothing different), 2 the record cannot be read.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .provenance import Hasher, files_of

IDENTICAL, WITHIN, UNVERIFIED, DIFFERENT = "identical", "within tolerance", "unverified", "different"
RANK = {IDENTICAL: 0, WITHIN: 1, UNVERIFIED: 2, DIFFERENT: 3}
EXIT = {IDENTICAL: 0, WITHIN: 1, UNVERIFIED: 4, DIFFERENT: 3}
TOLERANCES = {
    "hessian_rel": 1e-4,      # Hessians: max |a - b| / max |b| per array
    "tensor_rel": 1e-2,       # saved tensors without pruned zeros (norms, embeddings, GPTQ grids): the same
    "mask_agreement": 0.98,   # pruned weights: fraction of positions whose zero/nonzero state agrees
    "pruned_rms": 0.05,       # pruned weights: ||a - b|| / ||b||
    "table_rel": 1e-2,        # numbers in parquet and JSON files (per-linear losses, estimates, stats)
}
OPAQUE = ("fingerprint", "sha256")  # JSON values that name bytes: they differ whenever the bytes do
METRICS = "metrics"
DERIVED = ("metrics_summary", "report", "runs", "plots")


@dataclass
class Verdict:
    label: str
    status: str
    detail: str = ""

    def line(self) -> str:
        return f"{self.status:17s} {self.label}" + (f": {self.detail}" if self.detail else "")


def metric_values(root: Path, metrics_dir: Path) -> dict[str, dict]:
    """{file: content} of the per-model metrics files, to keep in the record."""
    return {str(f.relative_to(root)): json.loads(f.read_text()) for f in sorted(Path(metrics_dir).glob("*.json"))}


def _compare_metrics(old: dict, new: dict) -> tuple[str, str]:
    if "ppl" not in old or "ppl" not in new:
        return (IDENTICAL, "") if old == new else (DIFFERENT, "not both evaluated")
    if old.get("protocol") != new.get("protocol") or old["ppl"].keys() != new["ppl"].keys():
        return DIFFERENT, "another protocol or other texts"
    notes, status = [], WITHIN
    for name, ppl in new["ppl"].items():
        was = old["ppl"][name]
        lo_old, hi_old = old.get("ppl_ci95", {}).get(name, (was, was))
        lo_new, hi_new = new.get("ppl_ci95", {}).get(name, (ppl, ppl))
        inside = lo_old <= ppl <= hi_old and lo_new <= was <= hi_new
        status = status if inside else DIFFERENT
        notes.append(f"{name} {was:.2f} -> {ppl:.2f} ({ppl / was - 1:+.1%}, {'inside' if inside else 'outside'} "
                     f"[{lo_old:.1f}, {hi_old:.1f}])")
    return status, "; ".join(notes)


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    scale = float(np.abs(b).max()) if b.size else 0.0
    return float(np.abs(a - b).max()) / scale if scale > 0 else float(np.abs(a - b).max() if a.size else 0.0)


def _compare_arrays(pairs, rel_tolerance: float) -> tuple[str, str]:
    """pairs: (tensor name, a, b) float arrays of the same name; the worst tensor decides."""
    worst_rel = worst_mask = 0.0
    worst_rms, masked = 0.0, False
    for key, a, b in pairs:
        if a.shape != b.shape:
            return DIFFERENT, f"{key}: shape {a.shape} vs {b.shape}"
        a, b = a.astype(np.float64), b.astype(np.float64)
        zeros = b == 0
        if zeros.mean() > 0.05:  # a pruned tensor: compare masks and the survivors' energy
            masked = True
            worst_mask = max(worst_mask, float(((a == 0) != zeros).mean()))
            worst_rms = max(worst_rms, float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30)))
        else:
            worst_rel = max(worst_rel, _rel(a, b))
    t = TOLERANCES
    ok = worst_rel <= rel_tolerance and (not masked or (1 - worst_mask >= t["mask_agreement"]
                                                          and worst_rms <= t["pruned_rms"]))
    detail = f"max rel {worst_rel:.1e}"
    if masked:
        detail += f", masks agree {1 - worst_mask:.4f}, pruned rms {worst_rms:.1e}"
    return (WITHIN if ok else DIFFERENT), detail


def _safetensors(a: Path, b: Path):
    from safetensors.torch import load_file  # numpy has no bfloat16: floats compared as float32

    ta, tb = load_file(a), load_file(b)
    if ta.keys() != tb.keys():
        raise KeyError(f"other tensors: {sorted(set(ta) ^ set(tb))[:3]}")
    return [(k, ta[k].float().numpy(), tb[k].float().numpy()) for k in sorted(ta) if ta[k].is_floating_point()]


def _zarr_arrays(a: Path, b: Path):
    import zarr

    ga, gb = zarr.open_group(str(a), mode="r"), zarr.open_group(str(b), mode="r")
    out = []
    for path, arr in sorted(ga.members(max_depth=None)):
        if isinstance(arr, zarr.Array):
            out.append((path, np.asarray(arr[...]), np.asarray(gb[path][...])))
    return out


def _numbers(obj, prefix=""):
    if isinstance(obj, dict):
        for k in sorted(obj):
            yield from _numbers(obj[k], f"{prefix}.{k}")
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _numbers(v, f"{prefix}[{i}]")
    elif isinstance(obj, (int, float)) and not isinstance(obj, bool):
        yield prefix, float(obj)
    else:
        yield prefix, obj


def _compare_tables(a: Path, b: Path) -> tuple[str, str]:
    if a.suffix == ".parquet":
        import pandas as pd

        da, db = pd.read_parquet(a), pd.read_parquet(b)
        if list(da.columns) != list(db.columns) or len(da) != len(db):
            return DIFFERENT, "other columns or rows"
        na, nb = list(_numbers(da.to_dict("list"))), list(_numbers(db.to_dict("list")))
    else:
        na, nb = list(_numbers(json.loads(a.read_text()))), list(_numbers(json.loads(b.read_text())))
    if [k for k, _ in na] != [k for k, _ in nb]:
        return DIFFERENT, "other structure"
    worst, where, others = 0.0, "", 0
    for (key, x), (_, y) in zip(na, nb):
        if isinstance(x, float) and isinstance(y, float):
            rel = abs(x - y) / max(abs(y), 1e-12) if not (math.isnan(x) and math.isnan(y)) else 0.0
            if rel > worst:
                worst, where = rel, key
        elif x != y and not any(o in key for o in OPAQUE):
            others += 1
            where = where or key
    ok = worst <= TOLERANCES["table_rel"] and not others
    detail = f"max rel {worst:.1e}" + (f" at {where}" if where else "") + (f", {others} other value(s)" if others else "")
    return (WITHIN if ok else DIFFERENT), detail


def _compare_file(a: Path, b: Path) -> tuple[str, str]:
    """Numeric verdict of one changed file a (this run) against b (the recorded run's)."""
    try:
        if a.suffix == ".safetensors":
            return _compare_arrays(_safetensors(a, b), TOLERANCES["tensor_rel"])
        if a.suffix in (".parquet", ".json"):
            return _compare_tables(a, b)
    except (KeyError, ValueError, OSError) as exc:
        return DIFFERENT, f"{a.name}: {exc}"
    return UNVERIFIED, f"{a.name}: no numeric comparison for this kind of file"


def _worst(verdicts: list[tuple[str, str]]) -> tuple[str, str]:
    status = max((s for s, _ in verdicts), key=RANK.get, default=IDENTICAL)
    return status, "; ".join(d for s, d in verdicts if s == status and d)[:400]


def _judge_artifact(label: str, art: dict, root: Path, against: Path | None, hasher: Hasher,
                    record: dict) -> Verdict:
    changed, missing, added = [], [], []
    for rel, digest in art["files"].items():
        f = root / rel
        if not f.is_file():
            missing.append(rel)
        elif hasher(f) != digest:
            changed.append(rel)
    folder = root / art["path"]
    if art["kind"] == "dir" and folder.is_dir():
        added = [str(f.relative_to(root)) for f in files_of(folder) if str(f.relative_to(root)) not in art["files"]]
    if missing or added:
        return Verdict(label, DIFFERENT, f"{len(missing)} file(s) missing, {len(added)} added "
                                         f"(e.g. {(missing + added)[0]})")
    if not changed:
        return Verdict(label, IDENTICAL)
    if label == METRICS and "metric_values" in record:
        verdicts = [_compare_metrics(record["metric_values"].get(rel, {}), json.loads((root / rel).read_text()))
                    for rel in changed]
        return Verdict(label, *_worst(verdicts))
    if label == "params_file":
        import yaml

        now = yaml.safe_load((root / changed[0]).read_text()) or {}
        was = dict(record.get("params_yaml") or {})
        keys = sorted(k for k in set(now) | set(was) if k != "runtime" and now.get(k) != was.get(k))
        if keys:
            return Verdict(label, DIFFERENT, f"other parameters in {', '.join(keys)}")
        return Verdict(label, WITHIN, "same parameters" + (", other runtime" if now.get("runtime") != was.get("runtime")
                                                          else ", other formatting"))
    if against is None:
        return Verdict(label, UNVERIFIED, f"{len(changed)} of {len(art['files'])} file(s) changed "
                                          f"(give the recorded run's files to compare numbers)")
    if art["path"].endswith(".zarr"):  # a Hessian store: its arrays, not its chunk files
        base = Path(art["path"])
        try:
            return Verdict(label, *_compare_arrays(_zarr_arrays(root / base, against / base),
                                                   TOLERANCES["hessian_rel"]))
        except (KeyError, ValueError, OSError) as exc:
            return Verdict(label, DIFFERENT, f"{base}: {exc}")
    verdicts = []
    for rel in changed:
        other = against / rel
        verdicts.append(_compare_file(root / rel, other) if other.is_file() else (UNVERIFIED, f"{rel} not in {against}"))
    return Verdict(label, *_worst(verdicts))


def audit(record: dict, root: Path, against: Path | None = None) -> list[Verdict]:
    """One verdict per artifact of the record (see the module docstring)."""
    root = Path(root)
    hasher = Hasher()
    verdicts = {label: _judge_artifact(label, art, root, against, hasher, record)
                for label, art in record["artifacts"].items() if label not in DERIVED}
    follows = verdicts.get(METRICS, Verdict(METRICS, UNVERIFIED))
    for label in DERIVED:
        if label in record["artifacts"]:
            v = _judge_artifact(label, record["artifacts"][label], root, None, hasher, record)
            if v.status == UNVERIFIED:  # derived from the metrics: their verdict
                v = Verdict(label, follows.status if follows.status != IDENTICAL else UNVERIFIED,
                            "follows the metrics")
            verdicts[label] = v
    return list(verdicts.values())


def summary(verdicts: list[Verdict]) -> tuple[str, str]:
    """(overall status, one summary line)."""
    overall = max((v.status for v in verdicts), key=RANK.get, default=IDENTICAL)
    counts = {s: sum(v.status == s for v in verdicts) for s in RANK}
    parts = ", ".join(f"{n} {s}" for s, n in counts.items() if n)
    return overall, f"{overall}: {parts} (of {len(verdicts)} artifacts)"
