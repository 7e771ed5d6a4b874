"""Decoded-frame cache: a split decoded once into memory-mapped uint8 arrays, shared by every worker and trial.

Decoding three JPEGs and a PNG and resizing them costs ~5 ms per triplet; copying the decoded result costs ~0.1 ms.
The first time a split is read at an input size, :func:`ensure_cache` decodes it (threads: PIL releases the GIL)
into ``<cache dir>/<name>/``:

- ``frames.npy``: ``(N, 10, H, W)`` uint8, one row per triplet in the split's (name) order: RGB, NIR, TIR resized
  exactly as :class:`stmi.data.transforms.PairedTransform` resizes them (:func:`stmi.data.transforms.resize_stack`),
  and the binarised mask (zeros when the triplet has none);
- ``manifest.json`` (written last): format, fingerprint, input size, shape, dtype, byte size, CRC32 of sampled rows
  and of the whole file, and the per-triplet metadata (name, pid, camid, sceneid, has_mask).

Readers open ``frames.npy`` with ``np.load(mmap_mode="r")``: DataLoader workers and concurrent trials on the node
share the page cache, nothing is copied per worker.

Safety:

- The name holds a fingerprint of the split's files (paths, sizes, mtimes of every image and mask) and the input
  size, so a touched or replaced file, or another size, gets a new cache; older caches of the same dataset root,
  split and size are removed after a successful build.
- Builders take an exclusive ``fcntl.flock`` on ``<name>.lock``, build into ``<name>.tmp-<pid>-...`` and
  ``os.rename`` it into place: a concurrent builder waits, then finds the finished cache; a crash leaves only a
  temporary folder (removed by the next builder).
- On open, the file size, the ``.npy`` header and the CRC32 of sampled rows are checked against the manifest; a
  truncated or corrupt cache is rebuilt (``python -m stmi.data cache --verify`` checks every byte).
- Space is reserved up front (``posix_fallocate``): a full disk is a :class:`CacheError` naming the folder, the
  bytes needed and the setting to change, never a crash while the memory map is written.
- Bad image or mask files are reported at build time as today (``DatasetError``, every bad path with its fix).

Location: ``cfg.data.cache_dir``, else ``$STMI_CACHE_DIR``, else ``~/.cache/stmi/frames``; node-local disk.
``cfg.data.cache = false`` reads the images directly (``stmi.data.TripletDataset``).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
import shutil
import time
import zlib
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from stmi.data.batch_transforms import CHANNELS
from stmi.data.layouts import DatasetError, Triplet

log = logging.getLogger("stmi.data")

FORMAT = 1
"""Version of the cache layout; part of the fingerprint, so a new layout never reads an old cache."""
ENV_VAR = "STMI_CACHE_DIR"
_FIX = (f"set cfg.data.cache_dir (or ${ENV_VAR}) to a writable node-local folder with enough space, or set "
        f"cfg.data.cache=false to read the images directly")
_SAMPLE_ROWS = 16
_MAX_REPORTED = 20


class CacheError(RuntimeError):
    """The frame cache cannot be created or written (unwritable folder, full disk); names the folder and the fix."""


def default_cache_dir() -> Path:
    """``$STMI_CACHE_DIR`` or ``~/.cache/stmi/frames``."""
    env = os.environ.get(ENV_VAR)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "stmi" / "frames"


def resolve_cache_dir(cache_dir: str | os.PathLike[str] | None) -> Path:
    """``cache_dir`` if given (non-empty), else :func:`default_cache_dir`; made absolute."""
    d = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    return d.absolute()


def _files(t: Triplet) -> list[Path]:
    paths = [t.rgb] if t.frames is not None else [t.rgb, t.nir, t.tir]
    return [*paths, t.mask] if t.mask is not None else paths


def fingerprint(records: Sequence[Triplet], size: tuple[int, int]) -> str:
    """SHA-256 over the cache format, the input size and (path, size, mtime) of every file of ``records``.

    Raises:
        DatasetError: a file vanished since the split was listed (path named).
    """
    h = hashlib.sha256(f"stmi-frame-cache {FORMAT} {int(size[0])}x{int(size[1])}\n".encode())
    for t in records:
        h.update(f"{t.name}\t{t.frames}\n".encode())
        for p in _files(t):
            try:
                st = os.stat(p)
            except FileNotFoundError:
                raise DatasetError(f"image file {p} is missing; re-copy it or remove the triplet "
                                   f"(python -m stmi.data check lists all such files)") from None
            h.update(f"{p}\t{st.st_size}\t{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def cache_name(dataset: str, records: Sequence[Triplet], size: tuple[int, int], fp: str) -> tuple[str, str]:
    """(prefix shared by every version of this dataset root / split / size, full folder name)."""
    split = records[0].split_folder if records else "empty"
    root = hashlib.sha256(str(Path(records[0].rgb).parent.parent).encode()).hexdigest()[:8] if records else "0"
    prefix = f"{dataset}-{split}-{int(size[0])}x{int(size[1])}-{root}"
    return prefix, f"{prefix}-{fp[:20]}"


@dataclass
class FrameCache:
    """An opened cache: the memory-mapped frames and the manifest."""

    path: Path
    manifest: dict[str, Any]
    _frames: np.ndarray | None = None

    @property
    def frames(self) -> np.ndarray:
        """``(N, 10, H, W)`` uint8, memory-mapped read-only (opened lazily: after a fork or unpickling each process
        maps the file itself, sharing the page cache)."""
        if self._frames is None:
            self._frames = np.load(self.path / "frames.npy", mmap_mode="r")
        return self._frames

    @property
    def names(self) -> list[str]:
        return [r["name"] for r in self.manifest["records"]]

    def rows_of(self, records: Sequence[Triplet]) -> np.ndarray:
        """Row of each record in ``frames`` (by name; records of the split or a subset, e.g. a validation split)."""
        index = {n: i for i, n in enumerate(self.names)}
        try:
            return np.asarray([index[t.name] for t in records], dtype=np.int64)
        except KeyError as e:
            raise DatasetError(f"triplet {e.args[0]} is not in the frame cache {self.path}; delete that folder to "
                               f"rebuild it") from None

    @property
    def nbytes(self) -> int:
        return int(self.manifest["bytes"])

    def __getstate__(self) -> dict[str, Any]:
        return {"path": self.path, "manifest": self.manifest, "_frames": None}  # never pickle the mapped data


def _row_crc(frames: np.ndarray, rows: Iterator[int] | Sequence[int]) -> int:
    c = 0
    for r in rows:
        c = zlib.crc32(np.ascontiguousarray(frames[r]).data, c)
    return c


def _sample_rows(n: int) -> list[int]:
    return sorted({int(r) for r in np.linspace(0, n - 1, min(n, _SAMPLE_ROWS))}) if n else []


def _file_crc(path: Path) -> int:
    c = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            c = zlib.crc32(chunk, c)
    return c


def validate(path: Path, fp: str | None = None, full: bool = False) -> tuple[FrameCache | None, str]:
    """Open the cache at ``path`` if it is complete and intact: (cache, "") or (None, why not).

    Checks the manifest (format, fingerprint when ``fp`` is given), the byte size of ``frames.npy``, its header
    (shape, dtype) and the CRC32 of sampled rows; ``full`` also the CRC32 of the whole file.
    """
    man_path, fr_path = path / "manifest.json", path / "frames.npy"
    if not man_path.is_file():
        return None, "no manifest (incomplete build)"
    try:
        man = json.loads(man_path.read_text())
        if man.get("format") != FORMAT:
            return None, f"format {man.get('format')} != {FORMAT}"
        if fp is not None and man.get("fingerprint") != fp:
            return None, "fingerprint differs (dataset files changed)"
        size = fr_path.stat().st_size
        if size != man["file_bytes"]:
            return None, f"frames.npy is {size} bytes, the manifest says {man['file_bytes']} (truncated)"
        arr = np.load(fr_path, mmap_mode="r")
        if list(arr.shape) != man["shape"] or str(arr.dtype) != man["dtype"] or len(man["records"]) != arr.shape[0]:
            return None, f"frames.npy is {arr.shape} {arr.dtype}, the manifest says {man['shape']} {man['dtype']}"
        if _row_crc(arr, _sample_rows(arr.shape[0])) != man["sample_crc32"]:
            return None, "sampled rows do not match their checksum (corrupt)"
        if full and _file_crc(fr_path) != man["file_crc32"]:
            return None, "frames.npy does not match its checksum (corrupt)"
    except (OSError, ValueError, KeyError, TypeError) as e:
        return None, f"unreadable ({type(e).__name__}: {e})"
    return FrameCache(path, man, arr), ""


@contextlib.contextmanager
def _locked(lock_path: Path) -> Iterator[None]:
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o664)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("waiting for another process building the frame cache (lock %s)", lock_path)
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _writable_dir(d: Path) -> None:
    try:
        d.mkdir(parents=True, exist_ok=True)
        probe = d / f".probe-{os.getpid()}"
        probe.touch()
        probe.unlink()
    except OSError as e:
        raise CacheError(f"cannot write the frame cache folder {d} ({e.strerror or e}); {_FIX}") from None


def _decode(t: Triplet, size: tuple[int, int]) -> np.ndarray:
    """``(10, H, W)`` uint8 of one triplet (the exact resize of ``PairedTransform``)."""
    from stmi.data.transforms import resize_stack
    from stmi.data.triplet_dataset import load_frames, load_mask

    frames = load_frames(t)
    mask = load_mask(t, frames[0].size)
    x = resize_stack(frames, mask, size)
    out = np.zeros((CHANNELS, int(size[0]), int(size[1])), np.uint8)
    out[:x.shape[2]] = x.transpose(2, 0, 1)
    return out


def _reserve(path: Path, nbytes: int, cache_dir: Path) -> None:
    """Allocate the file's blocks now so a full disk is an error here, not a SIGBUS while writing the map."""
    fd = os.open(path, os.O_RDWR)
    try:
        os.posix_fallocate(fd, 0, nbytes)
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise CacheError(f"not enough space in the frame cache folder {cache_dir} for {nbytes / 1e9:.2f} GB "
                             f"({e.strerror}); {_FIX}") from None
        if e.errno not in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
            raise
    finally:
        os.close(fd)


def _build(tmp: Path, dataset: str, records: Sequence[Triplet], size: tuple[int, int], fp: str, cache_dir: Path,
           progress: bool, threads: int | None) -> None:
    n, (h, w) = len(records), (int(size[0]), int(size[1]))
    shape = (n, CHANNELS, h, w)
    need = n * CHANNELS * h * w
    free = shutil.disk_usage(cache_dir).free
    if need + (64 << 20) > free:
        raise CacheError(f"not enough space in the frame cache folder {cache_dir}: the cache of {dataset} "
                         f"({n} triplets at {h}x{w}) needs {need / 1e9:.2f} GB, {free / 1e9:.2f} GB are free; {_FIX}")
    tmp.mkdir()
    fr_path = tmp / "frames.npy"
    frames = np.lib.format.open_memmap(fr_path, mode="w+", dtype=np.uint8, shape=shape)
    _reserve(fr_path, fr_path.stat().st_size, cache_dir)
    errors: list[str] = []
    t0 = time.perf_counter()

    def work(i: int, frames: np.ndarray = frames) -> None:
        try:
            frames[i] = _decode(records[i], size)
        except DatasetError as e:
            errors.append(str(e))

    threads = threads or max(1, len(os.sched_getaffinity(0)))
    from tqdm import tqdm

    with ThreadPoolExecutor(threads) as pool, tqdm(total=n, desc=f"frame cache {dataset}", unit="triplet",
                                                  disable=not progress) as bar:
        for _ in pool.map(work, range(n), chunksize=8):
            bar.update(1)
    if errors:
        more = f" (and {len(errors) - _MAX_REPORTED} more)" if len(errors) > _MAX_REPORTED else ""
        raise DatasetError(f"{len(errors)} bad file(s) while building the frame cache of {dataset}{more}:\n  - "
                           + "\n  - ".join(sorted(errors)[:_MAX_REPORTED])
                           + f"\n(python -m stmi.data check --dataset {dataset} --root <root> lists every problem)")
    frames.flush()
    del frames, work
    file_bytes = fr_path.stat().st_size
    arr = np.load(fr_path, mmap_mode="r")
    man = {
        "format": FORMAT, "fingerprint": fp, "dataset": dataset, "split_folder": records[0].split_folder,
        "image_size": [h, w], "shape": list(shape), "dtype": "uint8", "bytes": need, "file_bytes": file_bytes,
        "sample_crc32": _row_crc(arr, _sample_rows(n)), "file_crc32": _file_crc(fr_path),
        "channels": ["rgb.r", "rgb.g", "rgb.b", "nir.r", "nir.g", "nir.b", "tir.r", "tir.g", "tir.b", "mask"],
        "build_s": round(time.perf_counter() - t0, 3), "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "records": [{"name": t.name, "pid": t.pid, "camid": t.camid, "sceneid": t.sceneid,
                     "has_mask": t.mask is not None} for t in records],
    }
    with open(fr_path, "rb+") as f:
        os.fsync(f.fileno())
    man_tmp = tmp / "manifest.json.part"
    man_tmp.write_text(json.dumps(man))
    os.replace(man_tmp, tmp / "manifest.json")  # written last: a folder without it is incomplete


def ensure_cache(dataset: str, records: Sequence[Triplet], size: tuple[int, int],
                 cache_dir: str | os.PathLike[str] | None = None, progress: bool = False,
                 threads: int | None = None) -> FrameCache:
    """The cache of ``records`` (one split, in name order) at input ``size`` (H, W): opened if valid, else built.

    Raises:
        CacheError: the cache folder cannot be created or written, or lacks the space (folder and fix named).
        DatasetError: bad image / mask files (every bad path listed with its fix).
    """
    if not records:
        raise DatasetError(f"cannot cache an empty split of {dataset}")
    d = resolve_cache_dir(cache_dir)
    fp = fingerprint(records, size)
    prefix, name = cache_name(dataset, records, size, fp)
    final = d / name
    cache, why = validate(final, fp)
    if cache is not None:
        return cache
    _writable_dir(d)
    try:
        with _locked(d / f"{name}.lock"):
            cache, why = validate(final, fp)  # another builder may have finished while we waited
            if cache is not None:
                return cache
            if final.exists():
                log.warning("frame cache %s is invalid (%s); rebuilding it", final, why)
                stale = d / f"{name}.stale-{os.getpid()}-{time.monotonic_ns()}"
                os.rename(final, stale)
                shutil.rmtree(stale, ignore_errors=True)
            for p in d.glob(f"{name}.tmp-*"):  # left by a builder that died (we hold the lock)
                shutil.rmtree(p, ignore_errors=True)
            tmp = d / f"{name}.tmp-{os.getpid()}-{time.monotonic_ns()}"
            log.info("building the frame cache of %s (%d triplets at %dx%d) in %s", dataset, len(records),
                     size[0], size[1], final)
            t0 = time.perf_counter()
            try:
                _build(tmp, dataset, records, size, fp, d, progress, threads)
                os.rename(tmp, final)
            except OSError as e:
                if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS):
                    raise CacheError(f"cannot write the frame cache in {d} ({e.strerror}); {_FIX}") from None
                raise
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
            log.info("frame cache %s built in %.1f s", final, time.perf_counter() - t0)
            for old in d.glob(f"{prefix}-*"):  # older versions of this root / split / size
                if old.is_dir() and old.name != name and ".tmp-" not in old.name:
                    shutil.rmtree(old, ignore_errors=True)  # a process still mapping it keeps its pages
    except PermissionError as e:
        raise CacheError(f"cannot write the frame cache folder {d} ({e.strerror}); {_FIX}") from None
    cache, why = validate(final, fp)
    if cache is None:
        raise CacheError(f"the frame cache {final} is invalid right after it was built ({why}); {_FIX}")
    return cache
