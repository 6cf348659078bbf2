"""The user documentation names only files that exist, and the README stays short.

Checked documents: README.md, docs/*.md and reports/RESULTS.md. In them:

- inline code spans: every whitespace-separated word that looks like a repository path
  (contains a "/" or ends in a known file extension) must exist relative to the repository
  root;
- markdown link targets that are relative paths must exist relative to the document that
  links them (as rendered), and a "#anchor" on a markdown target must name one of its headings.

Skipped: fenced code blocks (commands, examples with scratch paths), URLs, absolute paths and
paths outside the repository, globs, placeholders (<...>, ${...}, $VAR), and the outputs a
pipeline run creates (data/models, data/calib, ... ; see GENERATED).

No prunekit import: this runs before (and without) the package being importable.
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README_MAX_LINES = 150

# Folders under data/ that a pipeline run writes (dvc.yaml outs), absent from a fresh clone.
GENERATED = ("models", "calib", "hessians", "estimates", "pruned", "compressed", "schedule", "export", "sensitivity")
GENERATED_RE = re.compile(r"^data/(%s)(/|$)" % "|".join(GENERATED))
EXTENSIONS = (".py", ".md", ".yaml", ".yml", ".json", ".csv", ".txt", ".png", ".sh", ".toml", ".c", ".ini",
              ".parquet", ".raw", ".lock", ".cfg")

FENCE_RE = re.compile(r"^(```|~~~).*?^\1[ \t]*$", re.S | re.M)
CODE_RE = re.compile(r"`([^`\n]+)`")
LINK_RE = re.compile(r"!?\[[^\]\n]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HEADING_RE = re.compile(r"^#{1,6}[ \t]+(.+?)[ \t]*#*[ \t]*$", re.M)


def documents() -> list[Path]:
    docs = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "reports" / "RESULTS.md"]
    return [p for p in docs if p.is_file()]


def prose(path: Path) -> str:
    """The document without its fenced code blocks."""
    return FENCE_RE.sub("", path.read_text(encoding="utf-8"))


def _placeholder_or_glob(word: str) -> bool:
    return any(c in word for c in "<>*?[]{}$") or "://" in word


def path_words(span: str) -> list[str]:
    """The words of an inline code span that look like repository paths."""
    found = []
    for word in span.split():
        word = word.strip("\"'`,;:()")
        if "=" in word:                       # KEY=value, --flag=value: the value
            word = word.rsplit("=", 1)[1]
        if not word or _placeholder_or_glob(word) or word.startswith(("/", "~", "-", "..")):
            continue
        if "/" in word or word.lower().endswith(EXTENSIONS):
            found.append(word)
    return found


def _generated(rel: str) -> bool:
    return bool(GENERATED_RE.match(rel.removeprefix("./")))


def code_paths(path: Path) -> list[str]:
    """Repository paths named in inline code spans (relative to the root)."""
    words = [w for span in CODE_RE.findall(prose(path)) for w in path_words(span)]
    return [w for w in words if not _generated(w)]


def link_targets(path: Path) -> list[tuple[str, str]]:
    """(relative target path, anchor) of the document's local links."""
    out = []
    for target in LINK_RE.findall(prose(path)):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I) or target.startswith(("/", "#")):
            continue                          # URL, mailto:, absolute path, same-page anchor
        file, _, anchor = target.partition("#")
        if file and not _placeholder_or_glob(file):
            out.append((file, anchor))
    return out


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: markup dropped, lower case, punctuation removed, spaces to hyphens."""
    text = re.sub(r"`([^`]*)`", r"\1", heading)
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", text)
    text = re.sub(r"[*_]{1,3}([^*_]+)[*_]{1,3}", r"\1", text).lower()
    text = re.sub(r"[^\w\- ]", "", text, flags=re.UNICODE)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    result = set()
    for heading in HEADING_RE.findall(prose(path)):
        base = slug(heading)
        n = seen.get(base, 0)
        seen[base] = n + 1
        result.add(base if n == 0 else f"{base}-{n}")
    return result


def _rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def test_the_checked_documents_exist():
    names = {_rel(p) for p in documents()}
    assert {"README.md", "reports/RESULTS.md"} <= names
    assert any(n.startswith("docs/") for n in names)


@pytest.mark.parametrize("doc", documents(), ids=_rel)
def test_every_path_named_in_code_exists(doc: Path):
    missing = sorted({p for p in code_paths(doc) if not (ROOT / p).exists()})
    assert not missing, f"{_rel(doc)} names paths that do not exist: {missing}"


@pytest.mark.parametrize("doc", documents(), ids=_rel)
def test_every_link_target_exists(doc: Path):
    broken = []
    for file, anchor in link_targets(doc):
        target = (doc.parent / file).resolve()
        if not target.is_relative_to(ROOT):
            broken.append(f"{file} (outside the repository)")
        elif not _generated(_rel(target)) and not target.exists():
            broken.append(file)
        elif anchor and target.suffix == ".md" and target.is_file() and anchor not in anchors(target):
            broken.append(f"{file}#{anchor} (no such heading)")
    assert not broken, f"{_rel(doc)} links to missing targets: {broken}"


def test_readme_is_short():
    lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines; at most {README_MAX_LINES}"


# The extraction rules themselves, on small examples.

def test_path_words_keep_paths_and_skip_the_rest():
    assert path_words("bash scripts/job") == ["scripts/job"]
    assert path_words("params.yaml") == ["params.yaml"]
    assert path_words("--json reports/bench_streaming_depth.json") == ["reports/bench_streaming_depth.json"]
    assert path_words("data/models/<model>/") == []
    assert path_words("reports/h200/sensitivity_*.csv") == []
    assert path_words("s3://bucket/prunekit") == []
    assert path_words("/mnt/team/prunekit-dvc") == []
    assert path_words("${model.name}/x.json") == []
    assert path_words("dvc exp run -S prune.sparsity=0.6") == []
    assert path_words("-S model.source=/path/to/model") == []


def test_generated_outputs_are_skipped():
    assert _generated("data/pruned/gemma3-270m/")
    assert _generated("data/export")
    assert not _generated("data/SOURCES.md")
    assert not _generated("data/c4/c4_validation_2k.parquet")


def test_fenced_blocks_and_urls_are_not_checked(tmp_path: Path):
    doc = tmp_path / "x.md"
    doc.write_text("see `a/b.py` and [c](d/e.md#f) and [u](https://example.org/x.md)\n"
                   "```bash\nbash nothing/here.sh\n```\n", encoding="utf-8")
    assert CODE_RE.findall(prose(doc)) == ["a/b.py"]
    assert link_targets(doc) == [("d/e.md", "f")]


def test_slug_follows_github():
    assert slug("Allocators (`schedule.allocator`)") == "allocators-scheduleallocator"
    assert slug("2:4 semi-structured matmul on the H200") == "24-semi-structured-matmul-on-the-h200"
    assert slug("Numerical spread of uniform 70%") == "numerical-spread-of-uniform-70"
