"""The shard plan that labelling and counting share: corpus files cut into row ranges, planned once, resumed.

An output folder OUT of a sharded stage holds:
    OUT/manifest.json          the plan: sources (corpus files), shard size, each file's size and mtime, the shards
    OUT/<records>/NNNNN.json   shard N's record (done or failed), written by its worker after the shard's output

The plan is written only by the process that plans (and collects); a worker writes only its shard's files, each
atomically, the record last. So a record always describes complete output, a crash at any moment leaves each shard
done or to be redone, and every document lands in exactly one shard. Opening the plan again (`open_plan`) keeps it
when the inputs are unchanged, keeps the shards whose input rows are unchanged when a file was edited in place,
refuses another corpus unless asked to replan, and sweeps the temporary files of a killed run.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, TypeVar

from sparse_distill.corpus import check_columns, index_rows, read_rows
from sparse_distill.data import DataError, atomic_write_text, remove_temporaries
from sparse_distill.run_store import file_fingerprint

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"

T = TypeVar("T")


def from_dict(cls: type[T], obj: dict[str, Any]) -> T:
    """A dataclass from a JSON object, ignoring keys it does not have (older or richer records of the same shard)."""
    names = {f.name for f in fields(cls)}  # type: ignore[arg-type]
    return cls(**{k: v for k, v in obj.items() if k in names})


@dataclass(frozen=True)
class CorpusSource:
    """One input file and how to read it."""

    path: str
    text_column: str = "text"
    id_column: str | None = None
    limit: int | None = None
    id_prefix: str | None = None  # prefix of derived ids (`<prefix>:<row>`); default: the file name


def with_id_prefixes(sources: list[CorpusSource]) -> list[CorpusSource]:
    """Give derived ids a prefix unique across the sources: the file name, or the path below the common folder
    when two files share a name (`a/part-0.parquet` and `b/part-0.parquet`)."""
    seen: set[str] = set()
    for s in sources:
        if s.path in seen:
            raise DataError(f"{s.path}: listed twice in the corpus; each document must be processed once")
        seen.add(s.path)
    names = [Path(s.path).name for s in sources]
    if len(set(names)) == len(names):
        return sources
    common = os.path.commonpath([os.path.abspath(s.path) for s in sources])
    out = []
    for s in sources:
        if s.id_prefix is None and s.id_column is None:
            s = CorpusSource(
                s.path, s.text_column, s.id_column, s.limit, os.path.relpath(os.path.abspath(s.path), common)
            )
        out.append(s)
    return out


@dataclass
class ShardSpec:
    """A shard of the plan: rows [start, stop) of source `source`."""

    index: int
    source: int
    start: int
    stop: int
    offset: int | None = None  # byte offset of row `start` in a line-format file

    @property
    def name(self) -> str:
        """The shard's output file."""
        return f"{self.index:05d}.parquet"

    @property
    def record_name(self) -> str:
        """The shard's record file."""
        return f"{self.index:05d}.json"

    @property
    def size(self) -> int:
        return self.stop - self.start

    def spec(self) -> ShardSpec:
        """Only the plan's part (a record without its outcome)."""
        return ShardSpec(self.index, self.source, self.start, self.stop, self.offset)

    def same_rows(self, other: ShardSpec) -> bool:
        return (self.index, self.source, self.start, self.stop) == (other.index, other.source, other.start, other.stop)


@dataclass
class ShardRecord(ShardSpec):
    """What became of a shard: done (from the input with `input_checksum`) or failed (with its error). Each stage
    extends it with what its output needs to be checked."""

    status: str = "pending"
    input_checksum: str | None = None  # of the shard's ids and texts: which input the output belongs to
    seconds: float = 0.0
    error: str | None = None


@dataclass(frozen=True)
class PlanKind:
    """What a sharded output folder holds, and where."""

    name: str  # "labelling", "counting": names the plan in messages
    outputs: str  # what the folder holds, for messages: "labels", "counts"
    records: str  # the subfolder of the shards' outputs and records
    record_type: type[ShardRecord]
    more_folders: tuple[str, ...] = ()  # further outputs a replan discards (counting's partition sums)
    settings_file: str | None = None  # the settings the outputs depend on besides the corpus
    manifest_states: bool = False  # the manifest also keeps each shard's state as last collected (for readers)

    @property
    def folders(self) -> tuple[str, ...]:
        return (self.records, *self.more_folders)


@dataclass
class ShardPlan:
    """The plan of a sharded stage (`manifest.json`)."""

    sources: list[CorpusSource]
    shard_size: int
    shards: list[ShardSpec] = field(default_factory=list)
    stamps: list[dict[str, int]] = field(default_factory=list)  # size and mtime of each source when planned

    def to_json(self) -> dict:
        return {
            "sources": [asdict(s) for s in self.sources],
            "shard_size": self.shard_size,
            "stamps": self.stamps,
            "shards": [asdict(s) for s in self.shards],
        }

    @classmethod
    def from_json(cls, obj: dict, shard_type: type[ShardSpec] = ShardSpec) -> ShardPlan:
        return cls(
            sources=[CorpusSource(**s) for s in obj["sources"]],
            shard_size=int(obj["shard_size"]),
            shards=[from_dict(shard_type, s) for s in obj["shards"]],
            stamps=obj.get("stamps", []),
        )

    def save(self, out_dir: str | Path) -> None:
        atomic_write_text(Path(out_dir) / MANIFEST, json.dumps(self.to_json(), indent=2))

    @classmethod
    def load(cls, out_dir: str | Path, kind: PlanKind) -> ShardPlan:
        """The plan of `out_dir`; an error names the folder and the kind of plan missing or unreadable there."""
        path = Path(out_dir) / MANIFEST
        if not path.exists():
            raise FileNotFoundError(f"no {kind.name} manifest ({MANIFEST}) in {out_dir}")
        try:
            return cls.from_json(json.loads(path.read_text()))
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise DataError(f"{path}: not a {kind.name} manifest ({e})") from e

    @property
    def total_rows(self) -> int:
        return sum(s.size for s in self.shards)

    def same_plan(self, other: ShardPlan) -> bool:
        """Same sources (and their size and mtime), same shard size: the same shards."""
        return self.same_ranges(other) and self.stamps == other.stamps

    def same_ranges(self, other: ShardPlan) -> bool:
        """Same sources and the same row ranges, though a file may have been edited in place."""
        key = lambda m: [(s.source, s.start, s.stop) for s in m.shards]  # noqa: E731
        return self.sources == other.sources and self.shard_size == other.shard_size and key(self) == key(other)

    def same_files(self, other: ShardPlan) -> bool:
        """Same files read the same way and the same shard size; only the sources' row limits may differ."""
        unlimited = lambda m: [replace(s, limit=None) for s in m.sources]  # noqa: E731
        return self.shard_size == other.shard_size and unlimited(self) == unlimited(other)

    def work(self, indices: list[int]) -> list[dict[str, Any]]:
        """What the workers of these shards need (their spec and source), so no worker reads the manifest."""
        return [
            {"shard": asdict(self.shards[i].spec()), "source": asdict(self.sources[self.shards[i].source])}
            for i in indices
        ]


def work_item(work: dict[str, Any]) -> tuple[CorpusSource, ShardSpec]:
    """The source and shard of an item of `ShardPlan.work`."""
    return CorpusSource(**work["source"]), from_dict(ShardSpec, work["shard"])


def _stamp(path: str) -> dict[str, int]:
    # The file fingerprint less its path (the plan lists its sources already); -1s for a hub dataset (no file).
    fp = file_fingerprint(path)
    return {"size": fp.get("size", -1), "mtime_ns": fp.get("mtime_ns", -1)}


def plan_shards(sources: list[CorpusSource], shard_size: int) -> ShardPlan:
    """Deterministic plan: each source cut into consecutive row ranges of `shard_size` (streaming row count)."""
    sources = with_id_prefixes(sources)
    for src in sources:  # every file readable, with its columns: stop here rather than fail every shard
        check_columns(src.path, [c for c in (src.text_column, src.id_column) if c])
    shards: list[ShardSpec] = []
    for si, src in enumerate(sources):
        idx = index_rows(src.path, shard_size, src.limit)
        for k, start in enumerate(range(0, idx.rows, shard_size)):
            offset = idx.offsets[k] if idx.offsets is not None else None
            shards.append(ShardSpec(len(shards), si, start, min(idx.rows, start + shard_size), offset))
    logger.info("planned %d shards of up to %d docs over %d file(s)", len(shards), shard_size, len(sources))
    return ShardPlan(sources=sources, shard_size=shard_size, shards=shards, stamps=[_stamp(s.path) for s in sources])


def open_plan(
    out_dir: str | Path,
    kind: PlanKind,
    sources: list[CorpusSource],
    shard_size: int,
    replan: bool = False,
    settings: dict[str, Any] | None = None,
) -> ShardPlan:
    """The plan for `out_dir`: the existing one when it matches these sources, shard size and settings, else a new one.

    A different plan over existing outputs is an error unless `replan` (then they are removed), so a typo in a re-run
    command never silently mixes two corpora in one folder. When a file was edited in place (same row count), only
    the shards whose input rows changed are redone. Temporary files of a killed run are removed, and the plan is
    saved before any shard is worked on.
    """
    out = Path(out_dir)
    plan = plan_shards(sources, shard_size)
    try:
        old: ShardPlan | None = ShardPlan.load(out, kind)
    except FileNotFoundError:
        old = None
    same_settings = kind.settings_file is None or _read_settings(out / kind.settings_file) == settings
    if old is not None and same_settings and old.same_plan(plan):
        plan = old
    elif old is not None and same_settings and old.same_ranges(plan):
        _forget_changed_shards(out, kind, plan)
    elif old is not None and same_settings and not kind.more_folders and old.same_files(plan):
        # The same files with another row limit (a corpus grown or cut): the shards both plans share keep their
        # outputs, as labelling them again would cost what they cost the first time. Only for shards whose outputs
        # stand alone: counting's partition sums span every shard.
        _keep_shared_shards(out, kind, plan)
    elif old is not None:
        if not replan:
            extra = f", settings {_read_settings(out / kind.settings_file)}" if kind.settings_file else ""
            raise DataError(
                f"{out / MANIFEST}: this directory holds {kind.outputs} for another corpus or shard size or settings "
                f"({[s.path for s in old.sources]}, shard size {old.shard_size}{extra}, or a source changed since). "
                f"Use a new --out, or --replan to discard those {kind.outputs}."
            )
        logger.warning("%s: the inputs, shard size or settings changed; discarding the old %s", out, kind.outputs)
        for sub in kind.folders:
            for p in (out / sub).glob("*"):
                p.unlink()
    for sub in kind.folders:
        (out / sub).mkdir(parents=True, exist_ok=True)
        remove_temporaries(out / sub)
    if kind.settings_file:
        atomic_write_text(out / kind.settings_file, json.dumps(settings, indent=2))
    if kind.manifest_states:
        plan = collect_records(out, kind, plan)
    plan.save(out)
    return plan


def _read_settings(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _done_with_same_input(out: Path, kind: PlanKind, plan: ShardPlan, shard: ShardSpec) -> bool | None:
    """None when the shard has no done record for these rows; else whether its rows, read as the new plan finds them
    (byte offsets move when a line's length changes), still have the input the record was made from."""
    rec = read_record(out, kind, shard)
    if rec is None or rec.status != "done":
        return None
    return input_unchanged(plan.sources[shard.source], shard, rec.input_checksum)


def _forget_changed_shards(out: Path, kind: PlanKind, plan: ShardPlan) -> None:
    redo = 0
    for shard in plan.shards:
        if _done_with_same_input(out, kind, plan, shard) is False:
            (out / kind.records / shard.record_name).unlink(missing_ok=True)
            redo += 1
    logger.warning(
        "%s: a corpus file changed since planning; %d done shards have new input and will be redone", out, redo
    )


def _keep_shared_shards(out: Path, kind: PlanKind, plan: ShardPlan) -> None:
    # A done shard of the new plan is kept when the old plan had the same rows and they still read the same; every
    # other record and output goes (a cut corpus's shards past the limit, a last shard that grew).
    keep = {Path(s.name).stem for s in plan.shards if _done_with_same_input(out, kind, plan, s)}
    dropped = 0
    for path in (out / kind.records).glob("*"):
        if path.stem not in keep:
            path.unlink(missing_ok=True)
            dropped += path.suffix == ".json"
    logger.info(
        "%s: the corpus' row limits changed; %d done shards are kept, %d records dropped", out, len(keep), dropped
    )


# --- a shard's input and record -------------------------------------------------------------------------------------


def read_shard(src: CorpusSource, shard: ShardSpec) -> tuple[list[str], list[str]]:
    """Texts and ids of rows [shard.start, shard.stop) of `src`."""
    return read_rows(src.path, shard.start, shard.stop, src.text_column, src.id_column, shard.offset, src.id_prefix)


def input_checksum(ids: list[str], texts: list[str]) -> str:
    """SHA-256 over a shard's ids and texts."""
    h = hashlib.sha256()
    for i, t in zip(ids, texts, strict=True):
        h.update(i.encode())
        h.update(b"\x00")
        h.update(t.encode())
        h.update(b"\x01")
    return h.hexdigest()


def input_unchanged(source: CorpusSource, shard: ShardSpec, checksum: str | None) -> bool:
    """Whether the shard's rows, read now, still have the input checksum recorded when it was done."""
    try:
        texts, ids = read_shard(source, shard)
    except DataError:
        return False
    return input_checksum(ids, texts) == checksum


def read_record(out_dir: str | Path, kind: PlanKind, shard: ShardSpec) -> ShardRecord | None:
    """The shard's record if it is readable and belongs to this shard of the plan, else None."""
    path = Path(out_dir) / kind.records / shard.record_name
    try:
        rec = from_dict(kind.record_type, json.loads(path.read_text()))
    except (OSError, json.JSONDecodeError, TypeError):
        return None
    if not rec.same_rows(shard):
        return None
    rec.offset = shard.offset  # the plan's offset: the file may have been edited since the record
    return rec


def write_record(out_dir: str | Path, kind: PlanKind, record: ShardRecord) -> ShardRecord:
    """Write a shard's record (atomically: after its output, it says the output is complete)."""
    atomic_write_text(Path(out_dir) / kind.records / record.record_name, json.dumps(asdict(record), indent=2))
    return record


def record_failure(out_dir: str | Path, kind: PlanKind, shard: ShardSpec, error: str) -> ShardRecord:
    """Record a shard that failed after its retries, with its error."""
    spec = shard.spec()
    return write_record(out_dir, kind, kind.record_type(**asdict(spec), status="failed", error=error))


def record_failure_if_possible(out_dir: str | Path, kind: PlanKind, shard: ShardSpec, error: BaseException) -> None:
    """Record a shard's failure where it happened, before it propagates (to a retry, or to the flow): then the
    record tells the truth even if nothing after this runs. A failure to write the record (the disk is full) is
    logged, never raised over the original error."""
    try:
        record_failure(out_dir, kind, shard, f"{type(error).__name__}: {error}")
    except OSError as e:
        logger.error("shard %s: could not record its failure (%s): %s", shard.name, error, e)


def collect_records(out_dir: str | Path, kind: PlanKind, plan: ShardPlan) -> ShardPlan:
    """The plan with each shard replaced by its record (a pending one where there is none); in place, returned."""
    for i, shard in enumerate(plan.shards):
        plan.shards[i] = read_record(out_dir, kind, shard) or kind.record_type(**asdict(shard.spec()))
    return plan


# --- running the pending shards -------------------------------------------------------------------------------------


def pending_work(out_dir: str | Path, plan: ShardPlan, pending: list[int]) -> dict[str, Any]:
    """The small manifest a stage's planning step returns: the shards still to do, with their work items."""
    todo = set(pending)
    rows_done = sum(s.size for s in plan.shards if s.index not in todo)
    logger.info(
        "%s: %d shards, %d to do (%d of %d docs already done)",
        out_dir,
        len(plan.shards),
        len(pending),
        rows_done,
        plan.total_rows,
    )
    return {
        "out": str(Path(out_dir).resolve()),
        "shards": len(plan.shards),
        "pending": pending,
        "work": plan.work(pending),
        "rows_total": plan.total_rows,
        "rows_done": rows_done,
    }


def work_rows(work: dict[str, Any]) -> int:
    """The number of rows of a work item's shard."""
    return int(work["shard"]["stop"]) - int(work["shard"]["start"])


def run_pending(
    prep: dict[str, Any],
    run_one: Callable[[dict[str, Any]], Any],
    fail_one: Callable[[dict[str, Any], str], Any],
    progress: Callable[[int, int], None] | None = None,
) -> list[int]:
    """Run `prep`'s pending shards one after another in this process; returns the indices of those that failed.

    A shard that raises is recorded by `fail_one(work, error)` and the others go on.
    `progress(rows_done, rows_total)` is called after each shard.
    """
    done, failed = prep["rows_done"], []
    for work in prep["work"]:
        try:
            run_one(work)
            done += work_rows(work)
        except Exception as e:  # noqa: BLE001 - a bad shard is recorded, the others go on
            logger.error("shard %05d failed: %s", work["shard"]["index"], e)
            fail_one(work, f"{type(e).__name__}: {e}")
            failed.append(work["shard"]["index"])
        if progress:
            progress(done, prep["rows_total"])
    return failed
