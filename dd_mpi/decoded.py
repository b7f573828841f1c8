"""Image files decoded once into uint8 tensors, so that training augments whole batches with
tensor ops instead of decoding every image every epoch (a narrow sub-net eats images faster
than a few workers decode JPEGs: BENCHMARKS.md §5).

* **Small images** (a CIFAR-like ImageFolder) are decoded by rank 0 into memory and
  broadcast to every rank (``decode_in_memory``).
* **Large images** (Food-101, a large ImageFolder) go, with ``--cache-dir``, into a cache on
  disk: each image resized (shorter side to the test resize, 256 for 224) and centre-cropped
  to a square, stored as one ``.npy`` array that every rank memory-maps (``cached_split``).
  Rank 0 builds it, once (with a node-local folder, one rank per node); the ranks of a
  node then share one copy in the page cache.
  Training takes random-resized crops of the stored square (``data.resized_crop_flip``);
  testing its centre crop: the same pixels as the test transform.

A cache is only ever whole: it is written under a temporary name and renamed, and its name
hashes the exact samples it holds and a fingerprint of their files, so a changed dataset, image
size or sample cap builds a new one instead of reusing a stale one.

A build takes as long as it takes (hours for an ImageNet-sized folder), and the ranks that wait
for it wait in collectives bounded by --io-timeout: so the ranks that decode send a heartbeat
between batches (``build_while_others_wait``), and one that dies or hangs is still noticed.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import re
import signal
import socket
import threading
import time
from collections.abc import Callable
from contextlib import closing, contextmanager
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset
from torchvision import transforms as T

from .bundle import DatasetBundle, InMemorySplit
from .comm import verdict_of
from .errors import UsageError
from .formats import CheckedLoader, ShorterSideResize, missing_image, stored_size
from .launch import STOP_SIGNALS, worker_ignores_stop_signals
from .progress import log
from .rendezvous import node_memory

CACHE_FORMAT = 1  # bump when the stored pixels change meaning
DECODE_BATCH = 64  # images a DataLoader worker decodes per batch: a builder's heartbeat comes between batches
HEARTBEATS_PER_IO_TIMEOUT = 4  # a builder is heard from this often within --io-timeout ...
HEARTBEAT_SECONDS_MAX = 60.0  # ... and at least once a minute
PROGRESS_LOG_SECONDS = 60.0  # a build's "N % decoded" line, at most this often


def _unwrapped(split: Dataset) -> tuple[Dataset, list[int] | None]:
    """The image-file dataset under ``split`` and the indices a Subset keeps of it (None: all)."""
    return (split.dataset, split.indices) if isinstance(split, Subset) else (split, None)


def sample_list(split: Dataset) -> list[tuple[str, int]]:
    """(path, label) of every sample of an image-file split (ImageFolder, Food-101, a Subset)."""
    base, keep = _unwrapped(split)
    if hasattr(base, "samples"):  # ImageFolder
        samples = [(str(path), int(label)) for path, label in base.samples]
    else:  # torchvision's Food101
        samples = [(str(path), int(label)) for path, label in zip(base._image_files, base._labels)]
    return samples if keep is None else [samples[i] for i in keep]


class _Decoded(Dataset):
    """Samples as uint8 tensors: Resize(``resize``) + CentreCrop(``crop``), no normalisation."""

    def __init__(self, samples: list[tuple[str, int]], resize: int, crop: int):
        self.samples = samples
        self.transform = T.Compose([ShorterSideResize(resize), T.CenterCrop(crop), T.PILToTensor()])

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        path, label = self.samples[i]
        return self.transform(CheckedLoader()(path)), label


def _decoded_batches(dataset: _Decoded, workers: int):
    """(offset, images, labels) batches of ``dataset``, decoded by ``workers``.

    The workers are ended here, however the loop ends. A worker's error comes back inside a
    reference cycle, which keeps the loader (and its workers) alive until the interpreter
    exits; there multiprocessing stops them with SIGTERM, which they ignore
    (``worker_ignores_stop_signals``), and waits for them: the rank never ended."""
    offset = 0
    batches = iter(DataLoader(dataset, batch_size=DECODE_BATCH, num_workers=workers,
                              worker_init_fn=worker_ignores_stop_signals))
    try:
        for batch, targets in batches:
            yield offset, batch, targets
            offset += len(batch)
    except UsageError as error:  # from a worker: keep the one line
        raise UsageError(str(error).strip().splitlines()[-1].split("UsageError: ", 1)[-1]) from None
    finally:
        shutdown = getattr(batches, "_shutdown_workers", None)  # what the loader's __del__ calls
        if shutdown is not None:
            shutdown()


def _decode_into(images: torch.Tensor, labels: torch.Tensor, dataset: _Decoded, workers: int,
                 beat: Callable[[int], None]) -> None:
    with closing(_decoded_batches(dataset, workers)) as batches:  # (its workers end here, on an error too)
        for offset, batch, targets in batches:
            images[offset:offset + len(batch)] = batch
            labels[offset:offset + len(batch)] = targets
            beat(offset + len(batch))


# ---------------------------------------------------------------------------- waiting for a build

WORKING, DONE, FAILED = "working", "done", "failed"  # what a rank says in each round


class _Abandoned(Exception):
    """Another builder failed: this build stops (its temporaries removed) and this rank raises
    that failure with the others, instead of decoding on for an hour first."""


class Heartbeat:
    """A builder's ``beat(images decoded so far)``, called after every batch. At least every
    --io-timeout / 4 (and every minute) it joins a round of ``build_while_others_wait``: the
    waiting ranks hear that it lives. A builder that hangs (a stuck file system) beats no more,
    and the others' wait ends within --io-timeout, as any wait does. Without ``io_timeout``
    it beats after every batch (a round is a few small messages, a batch 64 decodes).
    It also logs progress, at most once per PROGRESS_LOG_SECONDS."""

    def __init__(self, comm, io_timeout: float | None, what: str, total: int):
        self.comm, self.what, self.total = comm, what, total
        self.every = 0.0 if io_timeout is None else min(io_timeout / HEARTBEATS_PER_IO_TIMEOUT, HEARTBEAT_SECONDS_MAX)
        self.start = self.last_beat = self.last_log = time.monotonic()

    def __call__(self, done: int) -> None:
        now = time.monotonic()
        if now - self.last_log >= PROGRESS_LOG_SECONDS and done < self.total:
            rate = done / max(now - self.start, 1e-9)
            log(f"{self.what}: {100 * done // max(self.total, 1)} % decoded ({done:,} of {self.total:,} images, "
                f"{rate:,.0f}/s)")
            self.last_log = now
        if self.comm.size > 1 and now - self.last_beat >= self.every:
            _, failure = _round(self.comm, (WORKING, None))
            self.last_beat = time.monotonic()
            if failure is not None:
                raise _Abandoned(failure)


def _round(comm, state: tuple[str, str | None]) -> tuple[bool, str | None]:
    """Every rank says its (state, failure); all learn (whether the builds are over, the first
    failure). Every rank sees the same list, so every rank leaves at the same round."""
    states = comm.slow.allgather_object(state)
    failures = [message for kind, message in states if kind == FAILED]
    return bool(failures) or all(kind != WORKING for kind, _ in states), (failures[0] if failures else None)


def build_while_others_wait(comm, builds: bool, build: Callable[[Heartbeat], str | None],
                            heartbeat: Heartbeat) -> str | None:
    """Run ``build(heartbeat)`` (None, or a failure's one line) on the ranks where ``builds``
    while every rank waits for all of them, however long they take; return the first failure,
    the same on every rank.

    The protocol: rounds of an allgather over ``comm.slow`` (each bounded by --io-timeout), in
    which every rank says WORKING, DONE or FAILED. A builder joins a round at each heartbeat,
    then at its end; the other ranks join round after round (each waits for the builders' next
    beat). The rounds stop when no rank is WORKING, or at once when one FAILED (the builders
    still working learn it at their next beat and stop). One builder (rank 0) or several (one
    per host, for node-local folders) alike."""
    state = (DONE, None)
    if builds:
        try:
            failure = build(heartbeat)
        except _Abandoned as abandoned:  # (that round was the last: every rank leaves with it)
            return str(abandoned)
        state = (FAILED, failure) if failure else (DONE, None)
    while True:
        finished, failure = _round(comm, state)
        if finished:
            return failure


def decoded_once(data: DatasetBundle, cfg, comm, workers: int) -> DatasetBundle:
    """``data`` with its image files decoded once: small ones into memory, large ones into
    the --cache-dir cache (module doc)."""
    if data.decode_size is not None:
        if cfg.cache_dir is not None:
            log(f"--cache-dir {cfg.cache_dir} not used: the images are small, decoded into memory", rank=comm.rank)
        check_in_memory_fits(len(data.train) + len(data.test), data.decode_size, comm)
        return replace(data, train=decode_in_memory(data.train, data.decode_size, comm, workers, cfg.io_timeout),
                       test=decode_in_memory(data.test, data.decode_size, comm, workers, cfg.io_timeout))
    return replace(data, **{split: cached_split(getattr(data, split), split_name=split, size=data.image_size,
                                                cfg=cfg, comm=comm, workers=workers)
                            for split in ("train", "test")})


def check_in_memory_fits(images: int, size: int, comm) -> None:
    """Refuse small images that, decoded at ``size`` (--image-size), do not fit in the memory
    of every rank (each holds them all): torch.empty of a terabyte was a traceback on every
    rank, and one just too large filled the node until the OOM killer ended the job. One
    verdict for all: every rank weighs every node's memory against its ranks."""
    need = images * (3 * size * size + 8)  # uint8 pixels and an int64 label each
    nodes: dict[str, list[int]] = {}
    for host, memory in comm.slow.allgather_object((socket.gethostname(), node_memory())):
        nodes.setdefault(host, []).append(memory)
    host, memories = min(nodes.items(), key=lambda item: min(item[1]) // len(item[1]))
    have = min(memories) // len(memories)
    if need > have:
        ranks = f"each of its {len(memories)} ranks" if len(memories) > 1 else "its rank"
        raise UsageError(f"--image-size {size}: the {images:,} small images, decoded in memory at {size} px, take "
                         f"{need / 2**30:,.1f} GiB on every rank, and {host}'s memory gives {ranks} "
                         f"{have / 2**30:,.1f} GiB: give a smaller --image-size, or cap --train-samples")


def decode_in_memory(split: Dataset, size: int, comm, workers: int, io_timeout: float | None = None) -> InMemorySplit:
    """A split of small image files decoded once, by rank 0 (its DataLoader workers), into
    uint8 tensors at ``size`` (the test transform without its normalisation), and broadcast
    to every rank. One rank reads the files, so a shared file system sees one pass, not one
    per rank; the others wait for it however long it takes (``Heartbeat``: every batch, or
    with ``io_timeout``, --io-timeout, every io_timeout / 4)."""
    samples = sample_list(split)
    images = torch.empty(len(samples), 3, size, size, dtype=torch.uint8)
    labels = torch.empty(len(samples), dtype=torch.int64)

    def decode(beat: Heartbeat) -> str | None:
        return verdict_of(lambda: _decode_into(images, labels, _Decoded(samples, size, size), workers, beat))

    heartbeat = Heartbeat(comm, io_timeout, "data", len(samples))
    failure = build_while_others_wait(comm, comm.rank == 0, decode, heartbeat)
    if failure is not None:  # an unreadable image: every rank raises rank 0's one line
        raise UsageError(failure)
    for tensor in (images, labels):
        moved = tensor.to(comm.device)
        comm.slow.broadcast_(moved)
        tensor.copy_(moved.cpu())
    return InMemorySplit(images, labels)


# ---------------------------------------------------------------------------- the disk cache

def cache_stem(cache_dir: str, dataset: str, split: str, samples: list[tuple[str, int]], size: int,
               data_dir: str, fingerprint: list) -> Path:
    """Where a split's cache lives: its name says what it is, its hash which samples (paths
    relative to --data-dir, so a copy of the data elsewhere finds the same cache) and what
    files (``files_fingerprint``)."""
    stored = stored_size(size)
    listing = [(os.path.relpath(path, data_dir), label) for path, label in samples]
    digest = hashlib.sha256(json.dumps([CACHE_FORMAT, stored, listing, fingerprint]).encode()).hexdigest()[:16]
    return Path(cache_dir) / f"{dataset}-{split}-{stored}px-{digest}"


FINGERPRINT_FILES = 1000


def files_fingerprint(samples: list[tuple[str, int]]) -> list[tuple[int, int]]:
    """(size, mtime in ns) of up to FINGERPRINT_FILES files spread evenly over ``samples``:
    another dataset under the same file names, or one processed again, builds a new cache
    instead of reusing the old pixels. A spread, not every file: stat-ing 101,000 files on a
    parallel file system at every start costs minutes (so one image edited alone may go unseen)."""
    step = max(1, -(-len(samples) // FINGERPRINT_FILES))
    stats = [os.stat(path) for path, _ in samples[::step]]
    return [(st.st_size, st.st_mtime_ns) for st in stats]


def _files(stem: Path) -> tuple[Path, Path, Path]:
    return stem.with_suffix(".images.npy"), stem.with_suffix(".labels.npy"), stem.with_suffix(".json")


def cache_is_whole(stem: Path) -> bool:
    return all(path.exists() for path in _files(stem))


def build_cache(stem: Path, samples: list[tuple[str, int]], size: int, workers: int,
                beat: Callable[[int], None] = lambda done: None) -> bool:
    """Decode ``samples`` into the cache at ``stem`` unless it is there, whole. Returns True
    if it was built; ``beat(images so far)`` after each batch (``Heartbeat``). Written under
    temporary names and renamed, the index last: a build that fails or is stopped leaves no
    cache that a later run would take for whole, and no temporaries either unless killed outright."""
    images_path, labels_path, index_path = _files(stem)
    if cache_is_whole(stem):
        return False
    stored = stored_size(size)
    stem.parent.mkdir(parents=True, exist_ok=True)
    writer = f"{socket.gethostname()}-{os.getpid()}"  # two jobs building at once (job arrays) write apart
    temporary = [path.with_name(f"{path.name}.tmp-{writer}") for path in (images_path, labels_path, index_path)]
    try:
        with _removed_if_stopped(temporary):
            # plain writes, not a memory map: a full disk is then an OSError, where a sparse
            # memory-mapped file kills the process with SIGBUS on the first page it cannot place
            shape = (len(samples), 3, stored, stored)
            labels = np.empty(len(samples), dtype=np.int64)
            with open(temporary[0], "wb") as file, \
                    closing(_decoded_batches(_Decoded(samples, stored, stored), workers)) as batches:
                np.lib.format.write_array_header_1_0(file, {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)),
                                                            "fortran_order": False, "shape": shape})
                for offset, batch, targets in batches:
                    file.write(batch.contiguous().numpy().tobytes())
                    labels[offset:offset + len(batch)] = targets.numpy()
                    beat(offset + len(batch))
                file.flush()
                os.fsync(file.fileno())
            with open(temporary[1], "wb") as file:
                np.save(file, labels)
            temporary[2].write_text(json.dumps({"format": CACHE_FORMAT, "samples": len(samples), "stored_px": stored,
                                                "first": samples[0][0] if samples else None}))
            for done, final in zip(temporary, (images_path, labels_path, index_path)):
                os.replace(done, final)
    finally:
        for path in temporary:
            path.unlink(missing_ok=True)
    return True


@contextmanager
def _removed_if_stopped(paths: list[Path]):
    """While a build writes ``paths``, a stop signal that would end the process outright (at
    start-up SIGTERM/SIGUSR1/SIGINT keep their default action: ``cli.StopSignal``) first deletes
    them, then ends it by that signal, as before. (Python runs the handler between bytecodes:
    a signal that comes during a heartbeat's collective or an fsync waits for its return; a
    SIGKILL that comes first leaves the files, as before.) ``remove_killed_builds`` deletes only a dead
    writer's files on its own host; a job requeued onto another node left an image cache's
    gigabytes in a shared folder for good. A handler already set (training's) is left alone."""
    if threading.current_thread() is not threading.main_thread():  # (only it may set handlers)
        yield
        return

    def remove_then_stop(signum, _frame):
        for path in paths:
            try:
                path.unlink(missing_ok=True)
            except OSError:
                pass
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)

    replaced = {signum: signal.signal(signum, remove_then_stop)
                for signum in STOP_SIGNALS if signal.getsignal(signum) == signal.SIG_DFL}
    try:
        yield
    finally:
        for signum, handler in replaced.items():
            signal.signal(signum, handler)


def remove_killed_builds(stem: Path, host: str) -> list[Path]:
    """Delete the temporaries that killed builds on this host left in this cache's folder, of
    this cache or of another of the dataset's (a build that fails cleans up after itself;
    SIGKILL or a lost node does not, an image cache's temporary can be gigabytes, and after
    the images changed no build of that cache comes again). A writer is known dead only on
    its own host, by its PID; another host's temporaries, or a live PID's (another job
    building now), are left."""
    dataset = stem.name.split("-", 1)[0]  # (cache_stem's names: DATASET-SPLIT-SIZEpx-HASH)
    removed = []
    mark = f".tmp-{host}-"
    for path in stem.parent.glob(glob.escape(f"{dataset}-") + "*" + glob.escape(mark) + "*"):
        pid = path.name.rsplit(mark, 1)[1]  # (all digits: host vm's glob also matches host vm-2's files)
        if not pid.isdigit() or _alive(int(pid)):
            continue
        try:
            path.unlink(missing_ok=True)
        except PermissionError:  # another user's, in a shared folder: theirs to remove
            continue
        removed.append(path)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def open_cache(stem: Path, size: int) -> InMemorySplit:
    """The cache at ``stem`` memory-mapped (copy-on-write: nothing this rank does reaches the
    file), once its files agree with its index: as many images as labels as samples, at the
    size it was built for. A file cut short or swapped for another build's was read as it
    came (half the test labels scored half a test set, silently); now it is a ValueError."""
    images_path, labels_path, index_path = _files(stem)
    index = json.loads(index_path.read_text())
    if not isinstance(index, dict):
        raise ValueError(f"{index_path.name} holds no cache index")
    images = np.load(images_path, mmap_mode="c")
    labels = np.load(labels_path, mmap_mode="c")
    rows, stored = index.get("samples"), stored_size(size)
    if index.get("stored_px") != stored:
        raise ValueError(f"{index_path.name} says {index.get('stored_px')} px, not {stored}")
    if images.dtype != np.uint8 or images.shape != (rows, 3, stored, stored):
        raise ValueError(f"{images_path.name} holds {images.dtype} {tuple(images.shape)}, not {rows} images "
                         f"of 3x{stored}x{stored} uint8 as {index_path.name} says")
    if labels.dtype != np.int64 or labels.shape != (rows,):
        raise ValueError(f"{labels_path.name} holds {labels.dtype} {tuple(labels.shape)}, not {rows} labels "
                         f"as {index_path.name} says")
    return InMemorySplit(torch.from_numpy(images), torch.from_numpy(labels), crop_to=size)


# $NAME, ${NAME}, ${NAME:-default}, ${NAME-default} (the default may hold $NAME and ~); any other
# ${...} is refused, nested braces too
SHELL_VARIABLE = re.compile(r"\$(?:(\w+)|\{(\w+)(?:(:?-)([^{}$]*(?:\$\w+[^{}$]*)*))?\}|(\{[^}]*\}?))")


def expand_cache_dir(flag_value: str, rank: int, environ=os.environ) -> tuple[str, str | None]:
    """--cache-dir as this rank reads it (``$VARS`` from its own environment, so that a quoted
    ``'$TMPDIR/dd-cache'`` is node-local), and why it cannot be used, if so. os.path.expandvars
    left an unset $NAME as it was (a folder named '$NAME' was built), expanded an empty one to
    nothing (a cache under /), and read ``${TMPDIR:-/scratch}`` as a variable of that name."""
    unset, empty, unknown = [], [], []

    def value(match: re.Match) -> str:
        name, form, default, other = match.group(1) or match.group(2), match.group(3), match.group(4), match.group(5)
        if other is not None:
            unknown.append(f"${other}")
            return match.group(0)
        got = environ.get(name)
        if form == ":-" and not got or form == "-" and got is None:
            return SHELL_VARIABLE.sub(value, os.path.expanduser(default))
        if got is None:
            unset.append(f"${name}")
        elif not got:
            empty.append(f"${name}")
        return got or ""

    folder = SHELL_VARIABLE.sub(value, os.path.expanduser(flag_value))
    where = f"on rank {rank} ({socket.gethostname()})"
    if unknown:
        return folder, (f"--cache-dir {flag_value}: {unknown[0]} is a shell form dd-train does not expand: give "
                        "$NAME, ${NAME} or ${NAME:-default}")
    for names, what, fix in ((unset, "not set", "export"), (empty, "empty", "give a value to")):
        if names:
            names = list(dict.fromkeys(names))
            one = len(names) == 1
            return folder, (f"--cache-dir {flag_value}: {', '.join(names)} {'is' if one else 'are'} {what} {where}: "
                            f"{fix} {'it' if one else 'them'} or give another folder")
    return folder, None


def _folder_problem(flag_value: str, folder: str, rank: int) -> str | None:
    """Why this rank cannot hold the cache in ``folder`` (--cache-dir expanded here), found
    before anything is written: a file where a folder should be, or a folder on the way that
    this user may not enter."""
    existing = Path(folder)
    try:
        while not existing.exists() and existing != existing.parent:
            existing = existing.parent
    except OSError as error:  # (a folder on the way this user may not enter: exists() raises)
        return (f"--cache-dir {flag_value}: cannot reach {error.filename or existing} ({error.strerror or error}) "
                f"on rank {rank} ({socket.gethostname()}): give a folder this user can write")
    if existing.exists() and not existing.is_dir():
        what = "names a file" if existing == Path(folder) else f"runs through the file {existing}"
        return f"--cache-dir {flag_value} {what}, not a folder: give a folder (it is made if missing)"
    return None


def cached_split(split: Dataset, *, split_name: str, size: int, cfg, comm, workers: int) -> InMemorySplit:
    """``split`` as the memory-mapped cache in ``cfg.cache_dir`` (``$VARS`` expanded on each
    rank, e.g. a node-local ``$TMPDIR``), built where it is missing, then opened by every rank.

    Rank 0 builds first: in a folder every rank shares, that one build serves all. Ranks that
    still do not see it have node-local folders: then the first such rank of each host builds
    its host's copy (every node decodes the files once). The other ranks wait as long as the
    builds take, hearing from the builders at least every --io-timeout / 4
    (``build_while_others_wait``). An unset variable, a file for a folder, an unreadable
    image, an unwritable folder or a cache a rank cannot read stops every rank with one line."""
    folder, problem = expand_cache_dir(cfg.cache_dir, comm.rank)
    problem = problem or _folder_problem(cfg.cache_dir, folder, comm.rank)
    problems = [problem for problem in comm.slow.allgather_object(problem) if problem]
    if problems:  # (on each rank: a variable may be unset on one node only)
        raise UsageError(problems[0])
    samples = sample_list(split)
    seen = None
    if comm.rank == 0:  # rank 0's files name the cache for all (one rank stats them, not every rank)
        try:
            seen = files_fingerprint(samples), None
        except FileNotFoundError as raised:  # (the same words as the loaders': what to restore or remove)
            lists = getattr(getattr(_unwrapped(split)[0], "loader", None), "lists", None)
            seen = None, f"--data-dir {cfg.data_dir}: {missing_image(raised.filename, lists)}"
        except OSError as raised:
            seen = None, f"--data-dir {cfg.data_dir}: {raised.filename}: {raised.strerror}"
    fingerprint, error = comm.slow.broadcast_object(seen)
    if error is not None:
        raise UsageError(error)
    stem = cache_stem(folder, cfg.dataset, split_name, samples, size, os.path.expanduser(cfg.data_dir), fingerprint)
    host, start, built = socket.gethostname(), time.perf_counter(), False

    def build(beat: Heartbeat) -> str | None:
        nonlocal built
        try:
            built = _build_logged(stem, samples, size, workers, split_name, host, beat) or built
        except UsageError as raised:
            return str(raised)
        except OSError as raised:
            return (f"--cache-dir {cfg.cache_dir}: cannot write the cache on {host} "
                    f"({raised.strerror or raised}): give a writable folder with room for it")
        return None

    builders = {0}  # then, for node-local folders, one rank per host that lacks it
    for _ in range(2):
        heartbeat = Heartbeat(comm, cfg.io_timeout, f"cache: {split_name} on {host}", len(samples))
        failure = build_while_others_wait(comm, comm.rank in builders, build, heartbeat)
        if failure is not None:
            raise UsageError(failure)
        states = comm.slow.allgather_object((host, cache_is_whole(stem)))
        missing = [(rank, where) for rank, (where, whole) in enumerate(states) if not whole]
        if not missing:
            break
        builders = {min(rank for rank, where in missing if where == h) for _, h in missing}
    else:
        rank, where = missing[0]
        raise UsageError(f"--cache-dir {cfg.cache_dir}: rank {rank} on {where} does not see the cache its host "
                         f"built ({stem.name}.*): give the ranks of a host one folder")
    error = None
    try:
        opened = open_cache(stem, size)
        if len(opened.labels) != len(samples):
            raise ValueError(f"{stem.name}.json says {len(opened.labels)} samples, the split has {len(samples)}")
        if not np.array_equal(opened.labels.numpy(), np.fromiter((label for _, label in samples), np.int64,
                                                                  len(samples))):  # (a damaged file: a
            raise ValueError(f"{stem.name}.labels.npy holds other labels than the split's")  # traceback in the loss)
    except (OSError, ValueError, EOFError) as raised:  # (EOFError: numpy's word for an empty file)
        error = f"{type(raised).__name__}: {raised}"
    failed = [(rank, message) for rank, message in enumerate(comm.slow.allgather_object(error)) if message]
    if failed:
        rank, message = failed[0]
        raise UsageError(f"--cache-dir {cfg.cache_dir}: rank {rank} cannot read the cache {stem.name}.* "
                         f"({message}): delete those files to have it rebuilt")
    what = f"built in {time.perf_counter() - start:.0f} s" if built else "reused"
    log(f"cache: {split_name} {len(samples):,} images at {stored_size(size)} px {what}: {stem}.*", rank=comm.rank)
    return opened


def _build_logged(stem: Path, samples, size: int, workers: int, split_name: str, host: str, beat: Heartbeat) -> bool:
    if not cache_is_whole(stem):
        for path in remove_killed_builds(stem, host):
            log(f"cache: removed {path}, left by a killed build on {host}")
        log(f"cache: decoding {len(samples):,} {split_name} images into {stem}.* on {host} with {workers} "
            f"worker{'' if workers == 1 else 's'} (once; the other ranks wait for it)")
    return build_cache(stem, samples, size, workers, beat)
