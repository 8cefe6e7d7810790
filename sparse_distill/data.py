"""Loading labelled splits and unlabelled corpora from Parquet, CSV, JSONL, text or a saved `datasets` folder; and
the atomic file and folder writers every module writes its outputs with."""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.json as pajson
import pyarrow.parquet as pq

logger = logging.getLogger(__name__)


class DataError(ValueError):
    """Bad input data: the message names the file, the row and the column."""


@dataclass(frozen=True)
class LabelMap:
    """Maps gold label values (ints or strings) to class indices 0..C-1 and back."""

    labels: tuple[Any, ...]

    @classmethod
    def from_values(cls, values: list[Any]) -> LabelMap:
        """Build a label map from the distinct values of a train set, sorted for determinism."""
        distinct = sorted(set(values), key=lambda v: (str(type(v)), v))
        return cls(tuple(distinct))

    @property
    def num_classes(self) -> int:
        return len(self.labels)

    @property
    def _lookup(self) -> dict[Any, int]:
        return {v: i for i, v in enumerate(self.labels)}

    def encode(self, values: list[Any], source: str = "<labels>", column: str = "label") -> list[int]:
        """Class indices for gold values; an unknown value is a DataError naming the row."""
        lookup = self._lookup
        out = []
        for row, v in enumerate(values):
            if v not in lookup:
                raise DataError(
                    f"{source}: row {row}, column {column!r}: label {v!r} never occurs in the train set "
                    f"(known labels: {list(self.labels)})"
                )
            out.append(lookup[v])
        return out

    def decode(self, index: int) -> Any:
        return self.labels[index]

    def to_json(self) -> dict[str, Any]:
        return {"labels": list(self.labels)}

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> LabelMap:
        return cls(tuple(obj["labels"]))

    def save(self, path: str | Path) -> None:
        atomic_write_text(path, json.dumps(self.to_json(), indent=2))

    @classmethod
    def load(cls, path: str | Path) -> LabelMap:
        return cls.from_json(json.loads(Path(path).read_text()))


@dataclass
class TextSplit:
    """A split held in memory: texts, optional gold labels (raw values) and ids."""

    texts: list[str]
    ids: list[str]
    labels: list[Any] | None
    source: str

    def __len__(self) -> int:
        return len(self.texts)


def file_checksum(path: str | Path) -> str:
    """SHA-256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# --- atomic writes: the one writer every module writes its outputs with ------------------------------------------
#
# A file is written to a temporary sibling `.NAME.~PID@HOST~XXXXXXXX.tmp` and renamed onto NAME (a rename within a
# folder is atomic), so a reader sees the old file or the new one, never half of one. The temporary name carries its
# writer (pid and host), so a sweep removes only the temporaries whose writer is gone (`remove_temporaries`). A folder
# NAME is built as `.NAME.tmp`, then the old NAME is moved aside to `.NAME.old`, the new one renamed in, and the old
# one deleted. A crash between the two renames leaves only `.NAME.old` (complete) and `.NAME.tmp`: the rule, applied
# by `recover_dir` (and so by the next `write_dir_atomically`), is that a lone aside folder is the output and is
# renamed back; an aside folder next to a live one is stale and deleted; a temporary one is never trusted and deleted.
# Every file and folder written is readable by all (mode 0666/0777 less the umask): some writers (mkstemp, safetensors)
# create private files, and a model is served by other users.

TMP_SUFFIX = ".tmp"
ASIDE_SUFFIX = ".old"
HOST = socket.gethostname().split(".")[0]
_OWNER = re.compile(r"~(\d+)@([^~/]+)~")


def _read_umask() -> int:
    # os.umask can only be read by setting it; done once, at import (before any thread writes).
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_UMASK = _read_umask()
FILE_MODE = 0o666 & ~_UMASK
DIR_MODE = 0o777 & ~_UMASK


def _share(path: Path) -> None:
    """Give a written file (or a folder and everything in it) the umask's ordinary modes."""
    if path.is_dir() and not path.is_symlink():
        os.chmod(path, DIR_MODE)
        for root, dirs, files in os.walk(path):
            for d in dirs:
                os.chmod(os.path.join(root, d), DIR_MODE)
            for f in files:
                if not os.path.islink(os.path.join(root, f)):
                    os.chmod(os.path.join(root, f), FILE_MODE)
    elif path.exists() and not path.is_symlink():
        os.chmod(path, FILE_MODE)


def owner_tag() -> str:
    """This process as a temporary file's owner: `~PID@HOST~`."""
    return f"~{os.getpid()}@{HOST}~"


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists on this machine."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by another user
    return True


def owner_alive(name: str) -> bool:
    """Whether the writer named in a temporary file's name is still running (on this machine; the writer of an
    unnamed or remote temporary cannot be asked, so it counts as gone: its folder's lock says nobody writes there)."""
    m = _OWNER.search(name)
    return m is not None and m.group(2) == HOST and pid_alive(int(m.group(1)))


@contextmanager
def atomic_path(path: str | Path, suffix: str = "") -> Iterator[Path]:
    """A temporary sibling of `path` to write into: renamed onto `path` when the block ends, deleted if it fails.

    `suffix` is added after `.tmp` for writers that pick a format or add an extension by name (`.npz`, `.png`).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.{owner_tag()}", suffix=TMP_SUFFIX + suffix)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        _share(tmp)  # mkstemp (and some writers) make files private; results are meant to be shared
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write(path: str | Path, write: Callable[[Path], object], suffix: str = "") -> Path:
    """Write a file atomically with `write(tmp)` (e.g. `pq.write_table`, `save_file`, `torch.save`); returns `path`."""
    with atomic_path(path, suffix) as tmp:
        write(tmp)
    return Path(path)


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write bytes atomically."""
    return atomic_write(path, lambda tmp: tmp.write_bytes(data))


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write text (UTF-8) atomically."""
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def atomic_write_parquet(table: pa.Table, path: str | Path, compression: str = "zstd") -> Path:
    """Write a Parquet file atomically."""
    return atomic_write(path, lambda tmp: pq.write_table(table, tmp, compression=compression))


def remove_temporaries(folder: str | Path) -> int:
    """Delete the temporary files and folders a killed writer left in `folder` (only renamed outputs count, so
    they are never read); returns how many. A temporary whose writer still runs on this machine is kept: only
    writers that are gone are swept (the caller holds the folder's lock, see `sparse_distill.locks`)."""
    n = 0
    for p in Path(folder).glob(f".*{TMP_SUFFIX}*"):
        if owner_alive(p.name):
            logger.info("%s: kept, its writer is still running", p)
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        n += 1
    return n


def _dir_siblings(out_dir: Path) -> tuple[Path, Path]:
    return out_dir.with_name(f".{out_dir.name}{TMP_SUFFIX}"), out_dir.with_name(f".{out_dir.name}{ASIDE_SUFFIX}")


def recover_dir(out_dir: str | Path) -> bool:
    """Finish what a writer of `out_dir` killed mid-way left (see the rule above); True if `out_dir` exists after.

    For the one process that writes `out_dir`, before it reads or writes it: readers never rename.
    """
    out_dir = Path(out_dir)
    tmp, aside = _dir_siblings(out_dir)
    shutil.rmtree(tmp, ignore_errors=True)
    if aside.exists():
        if out_dir.exists():
            shutil.rmtree(aside, ignore_errors=True)
        else:
            logger.warning("%s: restoring the folder a killed writer had moved aside", out_dir)
            os.replace(aside, out_dir)
    return out_dir.exists()


def write_dir_atomically(out_dir: str | Path, write: Callable[[Path], object]) -> Path:
    """Replace the folder `out_dir` with one that `write(tmp)` fills: a crash at any moment leaves the old folder or
    the new one, complete (restored by `recover_dir` when only the moved-aside old one is left)."""
    out_dir = Path(out_dir)
    recover_dir(out_dir)
    tmp, aside = _dir_siblings(out_dir)
    tmp.mkdir(parents=True)
    try:
        write(tmp)
        _share(tmp)
        if out_dir.exists():
            os.replace(out_dir, aside)
        try:
            os.replace(tmp, out_dir)
        except BaseException:
            if aside.exists() and not out_dir.exists():
                os.replace(aside, out_dir)  # put the old one back: never neither
            raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(aside, ignore_errors=True)
    return out_dir


def resolve_path(path: str, base: str | Path | None) -> str:
    """Resolve a split path against a base directory (hub: names pass through)."""
    if path.startswith("hub:") or base is None or os.path.isabs(path):
        return path
    return str(Path(base) / path)


def expand_paths(patterns: list[str], base: str | Path | None = None) -> list[str]:
    """Expand globs; a pattern matching nothing is an error naming it."""
    out: list[str] = []
    for pattern in patterns:
        full = resolve_path(pattern, base)
        if full.startswith("hub:"):
            out.append(full)
            continue
        matches = sorted(glob.glob(full)) if any(c in full for c in "*?[") else ([full] if os.path.exists(full) else [])
        if not matches:
            raise DataError(f"{full}: no such file")
        out.extend(matches)
    return out


def read_table(path: str) -> pa.Table:
    """Read a whole file as an Arrow table, by extension (or a saved datasets folder / hub:NAME:SPLIT)."""
    if path.startswith("hub:"):
        return _read_hub(path)
    p = Path(path)
    if not p.exists():
        raise DataError(f"{path}: no such file")
    try:
        if p.is_dir():
            return _read_saved_dataset(p)
        suffixes = "".join(p.suffixes[-2:]).lower()
        if p.suffix.lower() == ".parquet":
            return open_parquet(p).read()
        if p.suffix.lower() in (".jsonl", ".json") or suffixes in (".jsonl.gz",):
            return pajson.read_json(p)
        if p.suffix.lower() in (".csv", ".tsv") or suffixes in (".csv.gz", ".csv.bz2"):
            delim = "\t" if ".tsv" in suffixes or p.suffix.lower() == ".tsv" else ","
            return pacsv.read_csv(p, parse_options=pacsv.ParseOptions(delimiter=delim, newlines_in_values=True))
        if p.suffix.lower() in (".txt", ""):
            with open(p, "rb") as f:
                return pa.table({"text": pa.array(list(read_text_lines(f, path)), pa.string())})
    except (pa.ArrowException, UnicodeDecodeError, OSError) as e:
        raise DataError(f"{path}: cannot be read: {e}") from e
    raise DataError(f"{path}: unknown format (use .parquet, .csv, .tsv, .jsonl, .txt or a datasets folder)")


# --- text lines: the one rule for one-document-per-line input (corpora, splits, `predict`) ------------------------


def decode_line(raw: bytes, path: str, row: int) -> str:
    """One line of a line-format file (text or JSONL) as text: lines end at "\\n" only (never at U+0085, U+2028,
    form feeds or other separators that `str.splitlines` also breaks at), and lose that "\\n" and one "\\r" before it.
    A line that is not UTF-8 is a DataError naming the row."""
    if raw.endswith(b"\n"):
        raw = raw[:-1]
    if raw.endswith(b"\r"):
        raw = raw[:-1]
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: row {row}: not valid UTF-8 ({e})") from e


def read_text_lines(stream: BinaryIO, path: str, first_row: int = 0) -> Iterator[str]:
    """The lines of a binary stream (a file or stdin) by `decode_line`'s rule; a binary stream splits on b"\\n" only,
    so the rows here are the rows every reader of the same file counts."""
    for row, raw in enumerate(stream, start=first_row):
        yield decode_line(raw, path, row)


def _read_saved_dataset(p: Path) -> pa.Table:
    import datasets

    ds = datasets.load_from_disk(str(p))
    if isinstance(ds, datasets.DatasetDict):
        raise DataError(f"{p}: is a DatasetDict with splits {list(ds)}; point at one split's folder")
    return ds.data.table


def _read_hub(spec: str) -> pa.Table:
    # hub:NAME[:CONFIG]:SPLIT, e.g. hub:stanfordnlp/imdb:train (needs network access).
    import datasets

    parts = spec[4:].split(":")
    if len(parts) == 2:
        name, split, cfg = parts[0], parts[1], None
    elif len(parts) == 3:
        name, cfg, split = parts
    else:
        raise DataError(f"{spec}: expected hub:NAME:SPLIT or hub:NAME:CONFIG:SPLIT")
    return datasets.load_dataset(name, cfg, split=split).data.table


def _column(table: pa.Table, name: str, path: str) -> pa.ChunkedArray:
    if name not in table.column_names:
        raise DataError(f"{path}: column {name!r} not found (columns: {table.column_names})")
    return table.column(name)


def check_texts(texts: list[Any], path: str, column: str, first_row: int = 0) -> list[str]:
    """Every text must be a non-empty string: name the first row that is not."""
    for i, t in enumerate(texts):
        if t is None:
            raise DataError(f"{path}: row {first_row + i}, column {column!r}: text is missing (null)")
        if not isinstance(t, str):
            raise DataError(f"{path}: row {first_row + i}, column {column!r}: text is {type(t).__name__}, not a string")
        if not t.strip():
            raise DataError(f"{path}: row {first_row + i}, column {column!r}: text is empty")
    return texts


def load_split(
    path: str,
    text_column: str = "text",
    label_column: str | None = "label",
    id_column: str | None = None,
    limit: int | None = None,
) -> TextSplit:
    """Load a (labelled) split, validating texts and the presence of every named column."""
    table = read_table(path)
    if path.endswith(".txt") and text_column != "text":
        text_column = "text"
    if limit is not None:
        table = table.slice(0, limit)
    texts = check_texts(_column(table, text_column, path).to_pylist(), path, text_column)
    labels = None
    if label_column is not None:
        labels = _column(table, label_column, path).to_pylist()
        for i, v in enumerate(labels):
            if v is None:
                raise DataError(f"{path}: row {i}, column {label_column!r}: label is missing")
    ids = _ids(table, id_column, path)
    logger.info("loaded %s: %d rows", path, len(texts))
    return TextSplit(texts=texts, ids=ids, labels=labels, source=path)


def _ids(table: pa.Table, id_column: str | None, path: str, first_row: int = 0) -> list[str]:
    if id_column is None:
        # Stable ids from the file name and row number, so the same corpus always yields the same ids.
        return ids_for_rows(Path(path).name, first_row, table.num_rows)
    col = _column(table, id_column, path)
    ids = pc.cast(col, pa.string()).to_pylist()
    for i, v in enumerate(ids):
        if v is None:
            raise DataError(f"{path}: row {first_row + i}, column {id_column!r}: id is missing")
    return ids


def open_parquet(path: str | Path) -> pq.ParquetFile:
    """A Parquet file opened for reading; an empty, truncated or non-Parquet file is a DataError naming it."""
    try:
        return pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{path}: not a readable Parquet file ({e})") from e


def read_parquet_rows(path: str, start: int, stop: int, columns: list[str]) -> pa.Table:
    """Rows [start, stop) of a Parquet file, reading only the row groups that hold them."""
    pf = open_parquet(path)
    missing = [c for c in columns if c not in pf.schema_arrow.names]
    if missing:
        raise DataError(f"{path}: column {missing[0]!r} not found (columns: {pf.schema_arrow.names})")
    pieces, offset = [], 0
    for rg in range(pf.metadata.num_row_groups):
        n = pf.metadata.row_group(rg).num_rows
        lo, hi = max(start, offset), min(stop, offset + n)
        if lo < hi:
            pieces.append(pf.read_row_group(rg, columns=columns).slice(lo - offset, hi - lo))
        offset += n
        if offset >= stop:
            break
    if not pieces:
        return pa.table({c: pa.array([], pa.string()) for c in columns})
    return pa.concat_tables(pieces)


def ids_for_rows(prefix: str, start: int, n: int) -> list[str]:
    """Stable ids for rows without an id column: `<file>:<row>`, the same on every run."""
    return [f"{prefix}:{start + i}" for i in range(n)]
