"""Where a prepared dataset's files are read from: a local OUT in place, a remote one (any URI
pyarrow's file systems open: s3://, gs://, hdfs://) through a cache on this node's disk.

    files = DatasetFiles("s3://bucket/prepared", NodeCache("/local/cache", 50 * 2**30))
    with files.open("shards/b003-00001.tar") as stream: ...   # downloaded once per node

The cache holds whole files (a shard is ~1,000 images, one GET; a GET an image costs a round
trip each, measured in bench/remote_bench.py). A download goes to a temporary name and is renamed
when complete, under a lock file of its own, so the ranks and loader workers of a node download a
file once and never read a half-written one; a killed download leaves only its temporary, which
the next downloader of that file deletes. Past `limit` bytes the least recently used files go
(a file's mtime is its last use: a reader holds its shards open between batches and marks them
used about once a second, `OpenFiles`). The cache must be on a node-local disk (flock).

The endpoint and credentials of an object store come as the prepare job takes them: pyarrow's
(AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ... or `?endpoint_override=HOST:PORT&scheme=http` in the
URI; README, "Object stores").
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import fcntl
import hashlib
import os
import threading
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from functools import cached_property, partial
from pathlib import Path
from typing import BinaryIO, NamedTuple
from urllib.parse import urlsplit

import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipeline.format import split_uri

PARTIAL_MARK = ".partial-"  # a download in progress, or killed: never read
LOCK_SUFFIX = ".lock"
CHUNK_BYTES = 8 << 20  # read from the store in pieces this big: bounded memory a download
PREFETCH_THREADS = 4  # downloads a process runs ahead of need
DEFAULT_LIMIT = 20 * 10**9
TOUCH_SECONDS = 1.0  # how often a reader marks the remote files it holds open used, closes idle


def is_remote(uri: str) -> bool:
    """Whether `uri` names a store to download from (a scheme other than file://)."""
    scheme = urlsplit(str(uri)).scheme
    return len(scheme) > 1 and scheme != "file"  # one letter: a Windows drive


def default_cache_dir() -> Path:
    """$XDG_CACHE_HOME/arb-train, else ~/.cache/arb-train: where HF and pip users look."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "arb-train"


@contextlib.contextmanager
def locked(path: Path):
    """An exclusive flock on `path` (created if missing) for the block: across processes."""
    with open(path, "a+b") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def write_atomically(path: Path, write) -> None:
    """`write(temporary path)`, then the rename to `path`: complete or absent, never half."""
    temporary = path.with_name(f"{path.name}{PARTIAL_MARK}{os.getpid()}-{uuid.uuid4().hex}")
    try:
        write(temporary)
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


@dataclass(frozen=True)
class NodeCache:
    """Whole files of remote datasets under `folder`, at most `limit` bytes of them."""

    folder: Path
    limit: int = DEFAULT_LIMIT
    # Per process, not pickled with the cache into loader workers
    _state: dict = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "folder", Path(self.folder))

    def __getstate__(self) -> dict:
        return {"folder": self.folder, "limit": self.limit}

    def __setstate__(self, state: dict) -> None:
        object.__setattr__(self, "folder", state["folder"])
        object.__setattr__(self, "limit", state["limit"])
        object.__setattr__(self, "_state", {})

    def _local(self) -> dict:
        """This process's state: its download threads, counted downloads (a forked loader
        worker inherits its parent's dict, but not the threads)."""
        state = self._state
        if state.get("pid") != os.getpid():
            state.clear()
            state.update(
                pid=os.getpid(),
                downloads=0,
                hits=0,
                pending=set(),
                finished={},  # key -> time.monotonic() its job last finished
                mutex=threading.Lock(),
            )
        return state

    def counts(self) -> tuple[int, int]:
        """(hits, downloads) of this process's fetches: found complete in the cache, or
        downloaded by it (a fetch that waited for another process's download is a hit)."""
        state = self._local()
        return state["hits"], state["downloads"]

    def _count(self, name: str) -> None:
        state = self._local()
        with state["mutex"]:
            state[name] += 1

    def fetch(self, local: Path, download) -> Path:
        """`local` (a path under `folder`), made by `download(temporary path)` unless a file of
        that name is complete already; marked used."""
        if local.exists():
            with contextlib.suppress(FileNotFoundError):  # evicted meanwhile: download it
                os.utime(local)
                self._count("hits")
                return local
        local.parent.mkdir(parents=True, exist_ok=True)
        with locked(local.with_name(local.name + LOCK_SUFFIX)):
            if local.exists():  # another process finished it while this one waited
                self._count("hits")
            else:
                for stale in local.parent.glob(f"{local.name}{PARTIAL_MARK}*"):
                    stale.unlink(missing_ok=True)  # a killed download's: the lock is ours
                write_atomically(local, download)
                self._count("downloads")
                self.evict(keep=local)
        return local

    def evict(self, keep: Path | None = None) -> None:
        """Delete the least recently used files until the rest fit in `limit` (index maps,
        locks and downloads in progress are not counted; `keep` stays). A file another process
        has open stays readable to it until it closes it."""
        with locked(self.folder / ("evict" + LOCK_SUFFIX)):
            files = []
            for path in self.folder.rglob("*"):
                name = path.name
                if name.endswith((LOCK_SUFFIX, ".arrow")) or PARTIAL_MARK in name:
                    continue
                with contextlib.suppress(FileNotFoundError):
                    status = path.stat()
                    if path.is_file():
                        files.append((status.st_mtime_ns, status.st_size, path))
            total = sum(size for _, size, _ in files)
            for _, size, path in sorted(files, key=lambda entry: entry[:1]):
                if total <= self.limit:
                    break
                if path != keep:
                    path.unlink(missing_ok=True)
                    total -= size

    def run_ahead(self, job, key) -> None:
        """`job()` on this process's download threads, once per `key` at a time and not again
        within TOUCH_SECONDS of its last run: consecutive batches name mostly the same shards,
        and a job that finds its file cached costs the reading thread a GIL handover."""
        state = self._local()
        if "threads" not in state:
            state["threads"] = concurrent.futures.ThreadPoolExecutor(PREFETCH_THREADS)
        with state["mutex"]:
            finished = state["finished"].get(key, float("-inf"))
            if key in state["pending"] or time.monotonic() - finished < TOUCH_SECONDS:
                return
            state["pending"].add(key)

        def run() -> None:
            try:
                job()
            except Exception:  # the read that needs the file raises it again
                pass
            finally:
                with state["mutex"]:
                    state["pending"].discard(key)
                    state["finished"][key] = time.monotonic()

        state["threads"].submit(run)


@dataclass(frozen=True)
class DatasetFiles:
    """One prepared dataset's files by their paths relative to its root: in place when local,
    through `cache` when remote (its files under a folder named by the URI)."""

    uri: str
    cache: NodeCache | None = None
    version: str = ""  # the manifest's digest: a dataset prepared anew is cached anew

    @cached_property
    def remote(self) -> bool:
        """Whether files come through the cache (asked a read: parsed once)."""
        return is_remote(self.uri)

    @cached_property
    def cache_folder(self) -> Path:
        """This dataset's folder in the cache (a local one's holds only its index maps); computed
        once: a reader's every open of a file names it."""
        cache = self.cache or NodeCache(default_cache_dir())
        digest = hashlib.sha256(self.uri.encode()).hexdigest()[:16]
        return cache.folder / f"{digest}-{self.version}"

    def _store(self) -> tuple[pafs.FileSystem, str]:
        return split_uri(self.uri)

    def parquet(self, relative: str) -> pq.ParquetFile:
        """A Parquet file of the dataset, read from where it lies (row groups as asked)."""
        if not self.remote:
            return pq.ParquetFile(Path(self.uri) / relative)
        filesystem, root = self._store()
        return pq.ParquetFile(filesystem.open_input_file(f"{root}/{relative}"))

    def read_bytes(self, relative: str) -> bytes | None:
        """A small file's bytes, read from where it lies; None if it does not exist."""
        if not self.remote:
            path = Path(self.uri) / relative
            return path.read_bytes() if path.is_file() else None
        filesystem, root = self._store()
        try:
            with filesystem.open_input_stream(f"{root}/{relative}") as stream:
                return stream.read()
        except FileNotFoundError:
            return None

    def local(self, relative: str) -> Path:
        """A path on this node holding the file: itself when local, else the cache's copy."""
        if not self.remote:
            return Path(self.uri) / relative
        if self.cache is None:
            raise ValueError(f"{self.uri} is remote: it needs a NodeCache")
        return self.cache.fetch(self.cache_folder / relative, partial(self._download, relative))

    def open(self, relative: str) -> BinaryIO:
        """The file, opened for reading (fetched first when remote)."""
        for _ in range(3):  # evicted by another process between its fetch and this open
            with contextlib.suppress(FileNotFoundError):
                return open(self.local(relative), "rb")
        return open(self.local(relative), "rb")

    def prefetch(self, relative: str) -> None:
        """Start fetching a remote file on a background thread (nothing for a local one)."""
        if self.remote and self.cache is not None:
            self.cache.run_ahead(lambda: self.local(relative), (self.uri, relative))

    def _download(self, relative: str, to: Path) -> None:
        filesystem, root = self._store()
        with filesystem.open_input_stream(f"{root}/{relative}") as source, open(to, "wb") as sink:
            while chunk := source.read(CHUNK_BYTES):
                sink.write(chunk)


class FileRef(NamedTuple):
    """One file of a dataset (a shard, a latents tar): what the loader opens by offset."""

    files: DatasetFiles
    name: str  # relative to the dataset's root

    def open(self) -> BinaryIO:
        return self.files.open(self.name)

    def prefetch(self) -> None:
        self.files.prefetch(self.name)


class OpenFiles:
    """The files a reader keeps open, the `limit` it read last: reads by byte range cost a seek
    and a read, not an open, a stat and a close (10M images at 1,000 a shard are 10,000 shards,
    more than `ulimit -n`: hence the bound).

    A remote file stays open between batches too (a stat, a utime, an open and a close a shard a
    batch, and a prefetch job finding it cached, were what the node cache cost a batch:
    bench/README.md), kept honest with the cache by `sweep`, run before each batch: one evicted
    meanwhile is closed, so that a file held past its eviction keeps disk past the cache's limit
    until its reader's next batch, as when files were closed after each batch (unlinked, it still
    reads whole: POSIX keeps its inode while it is open); and every TOUCH_SECONDS, one not read
    since is closed. A held file is marked used (through its handle) at its first read after each
    such sweep: when it starts being read, so that a shuffle window's shards stay newer than the
    last window's even when a window takes less than TOUCH_SECONDS (marked at the sweep after
    its reads, the shards in use could be older than the last window's, evicted first, and
    downloaded again). A cached file is complete (a download is renamed when done), so a handle
    never reads partial bytes."""

    def __init__(self, limit: int):
        self.limit = limit
        self._open: OrderedDict[FileRef, BinaryIO] = OrderedDict()
        self._read: set[FileRef] = set()  # remote files read (and marked used) since the sweep due
        self._touched = time.monotonic()

    def __contains__(self, file: FileRef) -> bool:
        return file in self._open

    def read(self, file: FileRef, offset: int, size: int) -> bytes:
        """`size` bytes of `file` from `offset`, opening it (fetched first when remote) unless
        it is open; the file used longest ago is closed to make room."""
        stream = self._open.get(file)
        if stream is None:
            if len(self._open) >= self.limit:
                self._open.popitem(last=False)[1].close()
            stream = self._open[file] = file.open()
        else:
            self._open.move_to_end(file)
        if file.files.remote and file not in self._read:
            self._read.add(file)
            os.utime(stream.fileno())  # its first read since the last sweep due: used now
        stream.seek(offset)
        return stream.read(size)

    def sweep(self) -> None:
        """Close the remote files evicted from the cache (an fstat each); every TOUCH_SECONDS,
        close the ones not read since, and mark the others used again at their next read."""
        now = time.monotonic()
        due = now - self._touched >= TOUCH_SECONDS
        for file, stream in list(self._open.items()):
            if not file.files.remote:
                continue
            if not os.fstat(stream.fileno()).st_nlink or (due and file not in self._read):
                self._open.pop(file).close()
        if due:
            self._touched = now
            self._read.clear()
