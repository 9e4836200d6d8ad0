"""The HDF5 feature store: CNN codes addressed by the sha256 of the image's bytes.

One file per extractor (features/<extractor-id>.h5). Datasets: `keys` (N, S64) and
`layers/<name>` (N x D, chunked along N). Rows are appended in batches; the attribute
`n_committed` is advanced only after a batch is flushed, and readers trust only rows below it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import h5py
import numpy as np
from filelock import FileLock, Timeout

from tlflow.tasks.lib.core.errors import TlflowError, environment_error
from tlflow.tasks.lib.core.files import atomic_path

COMMITTED = "n_committed"
EXTRACTOR = "extractor"
VERSIONS = "versions"
THROUGHPUT = "throughput"  # {"images": n, "seconds": s} of the forward passes that filled it
_CHUNK_ROWS = 256
_ROOM_MARGIN = 1 << 20  # bytes kept free for HDF5's metadata beside a batch's chunks


def extractor_id(extractor: dict[str, Any]) -> str:
    """Short hash of the canonical JSON of everything that changes a code."""
    canonical = json.dumps(extractor, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def library_versions() -> dict[str, str]:
    """Versions of the libraries that computed the codes (informative, not part of the id)."""
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("torch", "timm", "torchvision", "h5py", "numpy", "pillow", "onnxruntime"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "absent"
    return out


@contextlib.contextmanager
def writer_lock(store: Path, timeout: float) -> Iterator[None]:
    """One writer per store (filelock's FileLock on `<store>.lock`): wait up to `timeout`
    seconds, saying so once, then fail. The OS releases it when the holder dies."""
    lock = store.with_name(store.name + ".lock")
    lock.parent.mkdir(parents=True, exist_ok=True)
    flock = FileLock(lock)
    try:
        flock.acquire(timeout=0)
    except Timeout:
        print(f"extract: waiting for another run to release {lock}", flush=True)
        try:
            flock.acquire(timeout=timeout)
        except Timeout:
            raise TlflowError(f"{store}: another extract run holds {lock.name} "
                              f"(waited {timeout:g} s; extract.lock_timeout)") from None
    try:
        yield
    finally:
        flock.release()


_REPAIR = ("delete it and run `tlflow stage extract` to recompute it, or `dvc checkout` to "
           "restore the committed one")


class FeatureStore:
    """Read and append codes in one HDF5 file."""

    def __init__(self, path: Path, mode: str = "r") -> None:
        self.path = Path(path)
        if mode == "r" and not self.path.is_file():
            raise TlflowError(f"{self.path}: feature store not found (run `tlflow stage extract`)")
        try:  # readers take no HDF5 file lock: they never block, and trust committed rows only
            self._h5 = h5py.File(self.path, mode, locking=mode != "r")
        except OSError as err:
            raise TlflowError(f"{self.path}: not a readable HDF5 feature store ({err}); "
                              f"{_REPAIR}") from None
        try:
            self._check_structure(mode)
        except TlflowError:
            self._h5.close()
            raise

    def _check_structure(self, mode: str) -> None:
        """A store opened to append is new (nothing committed, no extractor yet: `create`
        fills it, dropping what a create killed half-way left) or whole; one opened to read
        is whole: its attributes (extractor, committed rows) and datasets (keys, one per
        layer, as long as the committed rows) are there and readable. Anything else (a
        damaged header or key table, a dataset or attribute missing) is one line naming what
        and the repair, never a KeyError."""
        h5 = self._h5
        try:
            if EXTRACTOR not in h5.attrs and mode != "r" and (
                    "keys" not in h5 or h5["keys"].shape[0] == 0):
                for name in list(h5):  # a create killed before its attributes: start anew
                    del h5[name]
                return
            missing = [f"attribute {a}" for a in (EXTRACTOR, COMMITTED) if a not in h5.attrs]
            missing += [f"dataset {d}" for d in ("keys", "layers") if d not in h5]
            if not missing:
                layers = json.loads(h5.attrs[EXTRACTOR]).get("layers", [])
                missing += [f"dataset layers/{k}" for k in layers if k not in h5["layers"]]
                n = int(h5.attrs[COMMITTED])
                short = [name for name, ds in [("keys", h5["keys"]), *(
                    (f"layers/{k}", v) for k, v in h5["layers"].items())] if ds.shape[0] < n]
                missing += [f"rows of {name}" for name in short]
                if not len(h5["layers"]):
                    missing.append("every layer")
        except (OSError, KeyError, ValueError, TypeError) as err:  # unreadable metadata
            missing = [f"readable metadata ({type(err).__name__}: {err})"]
        if missing:
            raise TlflowError(f"{self.path}: damaged structure (missing {', '.join(missing)}); "
                              f"{_REPAIR}")

    @classmethod
    def create(
        cls, path: Path, extractor: dict[str, Any], dims: dict[str, int], dtype: str
    ) -> FeatureStore:
        """Open the store for appending, creating it with these layers if it is new."""
        path.parent.mkdir(parents=True, exist_ok=True)
        store = cls(path, "a")
        h5 = store._h5
        if EXTRACTOR not in h5.attrs:
            # Fletcher-32 on every chunk: HDF5 checks it on each read, so flipped bytes are an
            # error (`damaged`), never codes that silently lower the accuracy
            h5.create_dataset("keys", (0,), dtype="S64", maxshape=(None,), chunks=(4096,),
                              fletcher32=True)
            for name, dim in dims.items():
                h5.create_dataset(
                    f"layers/{name}", (0, dim), dtype=dtype, maxshape=(None, dim),
                    chunks=(_CHUNK_ROWS, dim), fletcher32=True,
                )
            h5.attrs[EXTRACTOR] = json.dumps(extractor, sort_keys=True)
            h5.attrs[VERSIONS] = json.dumps(library_versions(), sort_keys=True)
            h5.attrs[COMMITTED] = 0
            h5.flush()
        elif json.loads(h5.attrs[EXTRACTOR]) != extractor:
            store.close()
            raise TlflowError(f"{path}: holds codes of another extractor; remove it or rename it")
        return store

    # -- reading
    @property
    def extractor(self) -> dict[str, Any]:
        return json.loads(self._h5.attrs[EXTRACTOR])

    @property
    def versions(self) -> dict[str, str]:
        return json.loads(self._h5.attrs.get(VERSIONS, "{}"))

    @property
    def n_committed(self) -> int:
        return int(self._h5.attrs[COMMITTED])

    @property
    def layers(self) -> dict[str, int]:
        """Layer name -> code size."""
        return {name: ds.shape[1] for name, ds in self._h5["layers"].items()}

    @contextlib.contextmanager
    def _checked(self) -> Iterator[None]:
        """HDF5's read errors (a chunk failing its Fletcher-32 checksum, a truncated file) as
        one line naming the store and how to repair it."""
        try:
            yield
        except OSError as err:
            raise TlflowError(
                f"{self.path}: damaged ({err}); `tlflow features verify` lists the damaged "
                "datasets; delete the store and run `tlflow stage extract` to recompute it, "
                "or `dvc checkout` to restore the committed one") from None

    def keys(self) -> list[str]:
        """The committed keys, in row order."""
        with self._checked():
            return [k.decode() for k in self._h5["keys"][: self.n_committed]]

    def check_whole(self) -> None:
        """Refuse a damaged store (`verify` finds a chunk failing its checksum) in one line
        naming the datasets and the repair: it is never used as a cache."""
        damaged = self.verify()
        if damaged:
            raise TlflowError(f"{self.path}: damaged ({', '.join(damaged)} fail their "
                              "checksums); delete it and run extract again to recompute it, "
                              "or `dvc checkout` to restore the committed one")

    def verify(self) -> list[str]:
        """Read every committed chunk of every dataset (Fletcher-32 checks each): the names of
        the datasets that fail, empty when the store is whole."""
        bad = []
        for name in ["keys", *(f"layers/{layer}" for layer in self.layers)]:
            ds = self._h5[name]
            step = ds.chunks[0] if ds.chunks else max(1, self.n_committed)
            try:
                for start in range(0, self.n_committed, step):
                    ds[start:start + step]
            except OSError:
                bad.append(name)
        return bad

    def read(self, layer: str, keys: Iterable[str]) -> np.ndarray:
        """Codes of `layer` for `keys` (float32, in the order given)."""
        if layer not in self._h5["layers"]:
            raise TlflowError(f"{self.path}: no layer {layer!r}; has {sorted(self.layers)}")
        index = {k: i for i, k in enumerate(self.keys())}
        keys = list(keys)
        missing = [k for k in keys if k not in index]
        if missing:
            raise TlflowError(
                f"{self.path}: {len(missing)} image(s) have no codes, e.g. {missing[0]} "
                "(run `tlflow stage extract`)"
            )
        rows = np.fromiter((index[k] for k in keys), dtype=np.int64, count=len(keys))
        ds, n = self._h5["layers"][layer], self.n_committed
        wanted = np.unique(rows)  # h5py reads increasing, distinct indices
        with self._checked():
            if len(wanted) > n // 4:  # most of the layer: one sequential read is faster
                return ds[:n][rows].astype(np.float32)
            part = ds[wanted] if len(wanted) else np.empty((0, ds.shape[1]), ds.dtype)
        return part[np.searchsorted(wanted, rows)].astype(np.float32)

    def blocks(
        self, layer: str, rows: int = 8192, order: Iterable[int] | None = None
    ) -> Iterator[tuple[list[str], np.ndarray]]:
        """Committed (keys, float32 codes) of `layer`, `rows` store rows at a time.

        Block b holds rows [b * rows, (b + 1) * rows); `order` gives the block numbers to read
        (default: all, in order). One block is in memory at a time: the way to stream a store
        larger than memory.
        """
        if layer not in self._h5["layers"]:
            raise TlflowError(f"{self.path}: no layer {layer!r}; has {sorted(self.layers)}")
        ds, keys, n = self._h5["layers"][layer], self._h5["keys"], self.n_committed
        for b in range(self.n_blocks(rows)) if order is None else order:
            start, stop = b * rows, min((b + 1) * rows, n)
            with self._checked():
                block = [k.decode() for k in keys[start:stop]], ds[start:stop].astype(np.float32)
            yield block

    def n_blocks(self, rows: int) -> int:
        return -(-self.n_committed // rows)

    # -- writing
    def append(self, keys: list[str], codes: dict[str, np.ndarray]) -> None:
        """Append one batch, flush it, then advance the committed counter."""
        n, m = self.n_committed, len(keys)
        self._ensure_room(n, m)
        try:
            self._h5["keys"].resize((n + m,))
            self._h5["keys"][n:] = np.array(keys, dtype="S64")
            for name, ds in self._h5["layers"].items():
                ds.resize((n + m, ds.shape[1]))
                ds[n:] = codes[name]
            self._h5.flush()
            self._h5.attrs[COMMITTED] = n + m
            self._h5.flush()
        except (OSError, RuntimeError) as err:  # HDF5 reports a full disk as RuntimeError
            self._roll_back(n)
            raise (environment_error(err, self.path) or err) from None

    def _ensure_room(self, n: int, m: int) -> None:
        """Refuse a batch the disk cannot hold before HDF5 writes any of it: the chunks rows
        n..n+m may newly fill, plus room for metadata, must be free. HDF5 cannot undo a write
        that failed half-way as cleanly as it can avoid one (see `_roll_back`)."""
        need = _ROOM_MARGIN
        for ds in (self._h5["keys"], *self._h5["layers"].values()):
            rows = ds.chunks[0]
            chunk = rows * ds.dtype.itemsize * int(np.prod(ds.shape[1:], dtype=np.int64))
            need += (-(-(n + m) // rows) - n // rows) * chunk
        free = shutil.disk_usage(self.path.parent).free
        if free < need:
            raise TlflowError(f"{self.path}: disk full ({free / 2**20:.1f} MiB free, the next "
                              f"batch needs {need / 2**20:.1f} MiB); free space on that disk "
                              "and rerun: the committed rows are kept")

    def _roll_back(self, n: int) -> None:
        """After a failed write (a disk filled by another process after `_ensure_room`):
        shrink every dataset back to the `n` committed rows, dropping the dirty chunks HDF5
        could not write, so that closing the file does not retry them (which fails again and
        segfaults at exit, 139). It helps when the chunks did not fit; when HDF5's own
        metadata cannot be written either, closing still fails: the room check is the
        defence, this the fallback."""
        for ds in (self._h5["keys"], *self._h5["layers"].values()):
            with contextlib.suppress(Exception):
                ds.resize((n, *ds.shape[1:]))
        with contextlib.suppress(Exception):
            self._h5.attrs[COMMITTED] = n
        with contextlib.suppress(Exception):
            self._h5.flush()

    def size_bytes(self) -> int:
        return self.path.stat().st_size

    def record_throughput(self, images: int, seconds: float) -> None:
        """Add `images` codes computed in `seconds` (decoding and forward passes, wall time)
        to the store's record, which stays with its codes: a cached store keeps the speed
        measured when it was filled (metadata, not part of the extractor id)."""
        if images <= 0:
            return
        old = self.throughput_record
        self._h5.attrs[THROUGHPUT] = json.dumps(
            {"images": old["images"] + images, "seconds": old["seconds"] + seconds})
        self._h5.flush()

    @property
    def throughput_record(self) -> dict[str, float]:
        return json.loads(self._h5.attrs.get(THROUGHPUT, '{"images": 0, "seconds": 0.0}'))

    @property
    def images_per_second(self) -> float | None:
        """Codes computed per second when the store was filled; None if never measured."""
        rec = self.throughput_record
        return rec["images"] / rec["seconds"] if rec["seconds"] > 0 else None

    def close(self) -> None:
        self._h5.close()

    def __enter__(self) -> FeatureStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def prune(path: Path, keep: set[str]) -> tuple[int, int]:
    """Rewrite the store with only the committed rows whose key is in `keep`.

    The new file is built beside the old one and renamed over it, so a crash keeps the old.
    Returns (rows kept, rows removed). The caller holds the writer lock.
    """
    with FeatureStore(path) as old:
        keys = old.keys()
        rows = np.array([i for i, k in enumerate(keys) if k in keep], dtype=np.int64)
        if len(rows) == len(keys):
            return len(keys), 0
        with atomic_path(path) as tmp:
            new = FeatureStore.create(tmp, old.extractor, old.layers, _dtype(old))
            with new:
                new._h5.attrs[VERSIONS] = old._h5.attrs.get(VERSIONS, "{}")
                for start in range(0, len(rows), 4096):
                    part = rows[start : start + 4096]
                    new.append([keys[i] for i in part],
                               {n: old._h5["layers"][n][part] for n in old.layers})
    return len(rows), len(keys) - len(rows)


def _dtype(store: FeatureStore) -> str:
    return str(next(iter(store._h5["layers"].values())).dtype)


# ---------------------------------------------------------------- maintenance


def store_path(features_dir: Path, ext_id: str) -> Path:
    """Where the codes of one extractor live: <features>/<extractor-id>.h5."""
    return features_dir / f"{ext_id}.h5"


def gc(features_dir: Path, keep: set[str], timeout: float,
       dry_run: bool = False) -> list[tuple[Path, int, int]]:
    """Prune every store's rows whose key is not in `keep`.

    Returns (store, rows kept, rows removed) per store; each store is rewritten under its
    writer lock and renamed into place, so a crash leaves the old file whole.
    """
    out = []
    for path in sorted(features_dir.glob("*.h5")):
        with writer_lock(path, timeout):
            if dry_run:
                with FeatureStore(path) as store:
                    keys = store.keys()
                kept = sum(k in keep for k in keys)
                out.append((path, kept, len(keys) - kept))
            else:
                out.append((path, *prune(path, keep)))
    return out


def info(path: Path) -> dict[str, Any]:
    """What a store holds: extractor JSON, committed rows, layers and dims, size, versions."""
    with FeatureStore(path) as store:
        return {"store": str(path), "extractor_id": path.stem, "rows": store.n_committed,
                "layers": store.layers, "bytes": store.size_bytes(),
                "extractor": store.extractor, "versions": store.versions}
