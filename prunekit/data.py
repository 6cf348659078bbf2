"""Text sources and token windows for calibration and evaluation (the evaluation protocol).

- wikitext2 / wikitext2-valid: WikiText-2 raw; a blank line (" ") becomes "", any other line
  keeps its trailing newline, rows joined with "\\n\\n" (the HF rows as SparseGPT joins them).
- c4: documents [start, stop) of data/c4/c4_validation_2k.parquet joined with "\\n\\n";
  0–999 evaluate, 1000–1999 calibrate — never both.
- any other value: a plain text file, one sentence a line, joined with spaces.
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from .config import ConfigError

DATA_DIR = Path(__file__).resolve().parent.parent / "data"
WIKITEXT = {
    "wikitext2": DATA_DIR / "wikitext-2-raw-v1" / "wiki.test.raw",
    "wikitext2-valid": DATA_DIR / "wikitext-2-raw-v1" / "wiki.valid.raw",
}
C4_FILE = DATA_DIR / "c4" / "c4_validation_2k.parquet"
C4_EVAL_DOCS = (0, 1000)


def _existing(path: Path) -> Path:
    if not path.is_file():
        raise ConfigError(f"text file not found: {path}")
    return path


def _read_text(path: Path) -> str:
    """The UTF-8 text of a file; ConfigError naming the file and the first bad byte otherwise."""
    data = _existing(path).read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path} is not UTF-8 text (byte {exc.start} of {len(data)}): give a plain text file") from None


def wikitext_text(path: Path) -> str:
    rows = ["" if line.strip() == "" else line for line in _read_text(path).splitlines(True)]
    return "\n\n".join(rows)


def c4_text(docs: tuple[int, int]) -> str:
    import pyarrow.parquet as pq

    table = pq.read_table(_existing(C4_FILE), columns=["text"])
    start, stop = docs
    if stop > table.num_rows:
        raise ConfigError(f"C4 documents [{start}, {stop}) requested but the file has {table.num_rows}")
    return "\n\n".join(table.column("text").to_pylist()[start:stop])


def plain_text(path: Path) -> str:
    return " ".join(line.strip() for line in _read_text(path).splitlines() if line.strip())


def load_text(source: str, c4_docs: tuple[int, int] = C4_EVAL_DOCS) -> str:
    """The text of a named source ('wikitext2', 'wikitext2-valid', 'c4') or a text file path."""
    if source in WIKITEXT:
        return wikitext_text(WIKITEXT[source])
    if source == "c4":
        return c4_text(c4_docs)
    return plain_text(Path(source))


def tokenize(text: str, tokenizer) -> torch.Tensor:
    """Token ids of the text without special tokens, as a 1-D int64 tensor."""
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def bos_id(tokenizer) -> int | None:
    """The BOS id when the tokenizer prepends one to every sequence (Gemma, LLaMA), else None."""
    probe = tokenizer("a")["input_ids"]
    bos = tokenizer.bos_token_id
    return bos if bos is not None and probe and probe[0] == bos else None


def calibration_windows(ids: torch.Tensor, nsamples: int, seqlen: int, seed: int, bos: int | None) -> torch.Tensor:
    """nsamples random windows of seqlen tokens (BOS first when the tokenizer uses one).

    Start positions are drawn uniformly from the token stream with a seeded generator, so the
    same (text, tokenizer, nsamples, seqlen, seed) always gives the same windows.
    Returns (nsamples, seqlen) int64.
    """
    body = seqlen - (bos is not None)
    if len(ids) < max(nsamples * body, body + 1):
        raise ConfigError(
            f"calibration text has {len(ids)} tokens, too short for {nsamples} x {seqlen}-token windows"
        )
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(ids) - body, (nsamples,), generator=gen)
    windows = torch.stack([ids[s : s + body] for s in starts.tolist()])
    if bos is not None:
        windows = torch.cat([torch.full((nsamples, 1), bos, dtype=torch.long), windows], dim=1)
    return windows


def eval_windows(ids: torch.Tensor, seqlen: int, bos: int | None, max_windows: int | None = None) -> torch.Tensor:
    """Non-overlapping windows of seqlen tokens over the text, BOS first in each when used.

    With BOS every window holds seqlen - 1 text tokens, all of them predicted (the first from
    BOS). Returns (n_windows, seqlen) int64; a trailing partial window is dropped.
    """
    body = seqlen - (bos is not None)
    n = len(ids) // body
    if max_windows is not None:
        n = min(n, max_windows)
    if n == 0:
        raise ConfigError(f"evaluation text has {len(ids)} tokens, fewer than one {seqlen}-token window")
    windows = ids[: n * body].view(n, body)
    if bos is not None:
        windows = torch.cat([torch.full((n, 1), bos, dtype=torch.long), windows], dim=1)
    return windows


def _write_table(path, columns: dict, meta: dict) -> None:
    """Columns {name: pyarrow array} as one parquet file, written atomically, with `meta` attached."""
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq

    from .artifacts import write_atomic

    table = pa.table(columns).replace_schema_metadata({"prunekit": json.dumps(meta, sort_keys=True)})
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    write_atomic(path, sink.getvalue().to_pybytes())


def _read_table(path, what: str, convert: Callable[[dict[str, list]], Any]) -> tuple[Any, dict]:
    """(convert({column: values}), meta) of a file `_write_table` wrote; anything else -> one
    line naming `what`."""
    import json

    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
        meta = json.loads(table.schema.metadata[b"prunekit"])
        return convert(table.to_pydict()), meta
    except (OSError, ValueError, KeyError, TypeError) as exc:  # pyarrow's errors derive from these
        raise ConfigError(f"{path} is not a {what} written by the calibrate stage "
                          f"({type(exc).__name__}); rerun the calibrate stage") from None


def _ids(rows: list[list[int]]) -> list:
    import pyarrow as pa

    return pa.array(rows, type=pa.list_(pa.int32()))


def write_calibration(path, windows: torch.Tensor, meta: dict) -> None:
    """Token windows as parquet (one row a window) with `meta` (fingerprint, params) attached."""
    _write_table(path, {"input_ids": _ids(windows.tolist())}, meta)


def read_calibration(path) -> tuple[torch.Tensor, dict]:
    """(windows (n, seqlen) int64, meta) as written by write_calibration."""
    return _read_table(path, "calibration file", lambda c: torch.tensor(c["input_ids"], dtype=torch.long))


def write_token_streams(path, streams: dict[str, torch.Tensor], meta: dict) -> None:
    """Whole tokenized texts {name: ids} as parquet (one row a text) with `meta` attached, so
    that stages which score them need neither the texts nor the tokenizer."""
    import pyarrow as pa

    _write_table(path, {"name": pa.array(list(streams)), "input_ids": _ids([ids.tolist() for ids in streams.values()])},
                 meta)


def read_token_streams(path) -> tuple[dict[str, torch.Tensor], dict]:
    """({name: ids int64}, meta) as written by write_token_streams."""
    return _read_table(path, "token file", lambda c: {name: torch.tensor(ids, dtype=torch.long)
                                                      for name, ids in zip(c["name"], c["input_ids"])})
