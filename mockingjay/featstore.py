"""Ragged arrays on disk: many variable-length [T, D] matrices in one memory-mappable file.

Layout of a store directory::

    data.bin     the rows of every item, concatenated, row-major, in `dtype`
    index.tsv    one line per item: id, offset (in rows), length (in rows)
    meta.json    dtype, dim, number of items and rows, plus free-form `attrs`

Training and probing read items straight from the memory map, so nothing is decoded
again and memory stays flat whatever the corpus size. Every value must be finite: float16 turns
anything above 65504 into inf, and one NaN or inf gives a probe below the majority rate with no
error. The writer refuses an item that holds one, and readers for training and probing open
stores with `finite=True`, which checks the whole store once (vectorised, in chunks). A store is written into a
temporary sibling directory and renamed into place when complete (`mockingjay.atomic`), so a reader never
sees a half-written store (a crash leaves only the temporary directory behind).

This module is the only one that names, writes, reads or fingerprints these files: `RaggedWriter`
appends items in order, `PresizedWriter` writes items in any order into the row layout of another
store, `RaggedArray` reads, `is_store` and `fingerprint` look at a store without opening it. Which
store lives where in a stage's folder is `store_layout.py`'s.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Iterator

import numpy as np

from mockingjay.atomic import publish_directory, temporary_directory, write_json

_META = "meta.json"
_INDEX = "index.tsv"
_DATA = "data.bin"


class StoreError(RuntimeError):
    """A store directory is missing, incomplete or inconsistent."""


def is_store(path: str | Path) -> bool:
    """True when `path` holds a complete store (its meta file is written last, on publishing)."""
    return (Path(path) / _META).is_file()


def fingerprint(stores: Iterable[str | Path]) -> str:
    """sha256 (hex) of the stores' indexes in order: their utterance ids, offsets and lengths. Two
    stores of the same utterances with the same lengths share it, whatever the values."""
    digest = hashlib.sha256()
    for store in stores:
        digest.update((Path(store) / _INDEX).read_bytes())
    return digest.hexdigest()


def _publish(
    tmp: Path,
    path: Path,
    ids: Sequence[str],
    offsets: Iterable[int],
    lengths: Iterable[int],
    dtype: np.dtype,
    dim: int,
    rows: int,
    attrs: dict,
) -> Path:
    """Write the index and meta of the data file already in `tmp`, then rename `tmp` to `path`."""
    with open(tmp / _INDEX, "w") as f:
        for item_id, offset, length in zip(ids, offsets, lengths):
            f.write(f"{item_id}\t{offset}\t{length}\n")
    meta = {"dtype": dtype.name, "dim": dim, "items": len(ids), "rows": rows, "attrs": attrs}
    write_json(tmp / _META, meta, default=None)
    return publish_directory(tmp, path)


def _split_of(path: Path) -> str:
    """The split a store belongs to (features: <root>/train, representations: <root>/train/layer_03)."""
    for part in reversed(Path(path).parts):
        if part in ("train", "dev", "test"):
            return f"split {part}, "
    return ""


def _non_finite(path: Path, item_id: str, values: np.ndarray, dtype: np.dtype) -> StoreError:
    nan, inf = int(np.isnan(values).sum()), int(np.isinf(values).sum())
    limit = (
        f" ({dtype.name} holds at most {float(np.finfo(dtype).max):g})" if dtype.kind == "f" else ""
    )
    return StoreError(
        f"{path}: {_split_of(path)}utterance {item_id!r} has {nan} NaN and {inf} inf values{limit}; "
        "non-finite features or representations give wrong probe results and training losses. "
        "Find what produced them (audio, feature settings, the model) and rerun the stage that wrote it"
    )


class RaggedWriter:
    """Appends [T, D] items to a new store; `close()` publishes it atomically.

    Use as a context manager: on an exception the partial store is removed.
    """

    def __init__(
        self, path: str | Path, dim: int, dtype: str = "float16", attrs: dict | None = None
    ):
        self.path = Path(path)
        self.dim = int(dim)
        self.dtype = np.dtype(dtype)
        self.attrs = dict(attrs or {})
        self._tmp = temporary_directory(self.path)
        self._data = open(self._tmp / _DATA, "wb")
        self._ids: list[str] = []
        self._offsets: list[int] = []
        self._lengths: list[int] = []
        self._rows = 0
        self._pending = 0  # rows of the item being written

    def append(self, item_id: str, rows: np.ndarray) -> None:
        self.extend(rows, item_id)
        self.end_item(item_id)

    def extend(self, rows: np.ndarray, item_id: str | None = None) -> None:
        """Write rows of the item being written (an item too long to hold whole comes in blocks);
        `item_id`, when known already, names it in errors."""
        rows = np.asarray(rows)
        if rows.ndim == 1 and self.dim == 1:
            rows = rows[:, None]
        if rows.ndim != 2 or rows.shape[1] != self.dim:
            raise ValueError(
                f"item {item_id or len(self._ids)!r}: expected shape [T, {self.dim}], "
                f"got {list(rows.shape)}"
            )
        with np.errstate(
            over="ignore"
        ):  # after the cast values above 65504 are inf: refused just below
            data = np.ascontiguousarray(rows, dtype=self.dtype)
        if data.dtype.kind == "f" and not np.isfinite(data).all():
            raise _non_finite(
                self.path, item_id or f"number {len(self._ids)} (being written)", data, self.dtype
            )
        self._data.write(data.tobytes())
        self._pending += rows.shape[0]

    def end_item(self, item_id: str) -> int:
        """Record the rows written since the last item as item `item_id`; returns its length."""
        if "\t" in item_id or "\n" in item_id:
            raise ValueError(f"item id {item_id!r} contains a tab or newline")
        self._ids.append(item_id)
        self._offsets.append(self._rows)
        self._lengths.append(self._pending)
        self._rows += self._pending
        length, self._pending = self._pending, 0
        return length

    def close(self) -> Path:
        self._data.close()
        return _publish(
            self._tmp,
            self.path,
            self._ids,
            self._offsets,
            self._lengths,
            self.dtype,
            self.dim,
            self._rows,
            self.attrs,
        )

    def abort(self) -> None:
        self._data.close()
        shutil.rmtree(self._tmp, ignore_errors=True)

    def __enter__(self) -> "RaggedWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


class PresizedWriter:
    """Writes a store whose row layout (ids, offsets, lengths) copies `template`'s, items in any order.

    The data file is created at its final size (sparse until written) and every item is written at
    its template offset, so a writer fed in another order (extraction's length-sorted batches) needs
    no reorder buffer. `close()` checks that every item arrived, then publishes the store as
    `RaggedWriter` does and opens it once to validate sizes and index. `abort()` removes it.
    """

    def __init__(
        self,
        path: str | Path,
        template: RaggedArray,
        dim: int,
        attrs: dict | None = None,
        dtype: str = "float16",
    ):
        self.path, self.template, self.dim = Path(path), template, int(dim)
        self.attrs = dict(attrs or {})
        self.dtype = np.dtype(dtype)
        self._tmp = temporary_directory(self.path)
        self._row_bytes = self.dim * self.dtype.itemsize
        self._file = open(self._tmp / _DATA, "wb")
        self._file.truncate(int(template.lengths.sum()) * self._row_bytes)
        self._written = np.zeros(len(template), dtype=bool)

    def write(self, item: int, rows: np.ndarray, start: int = 0) -> None:
        """Rows [start, start + len(rows)) of item number `item`; the item counts as written with its
        last rows (windows of a long utterance arrive in order)."""
        length = int(self.template.lengths[item])
        if rows.ndim != 2 or rows.shape[1] != self.dim or start + rows.shape[0] > length:
            raise ValueError(
                f"{self.path}: item {self.template.ids[item]!r}: got {list(rows.shape)} rows at frame "
                f"{start} for [{length}, {self.dim}]"
            )
        with np.errstate(
            over="ignore"
        ):  # after the cast values above 65504 are inf: refused just below
            data = np.ascontiguousarray(rows, dtype=self.dtype)
        if not np.isfinite(data).all():
            raise _non_finite(self.path, self.template.ids[item], data, self.dtype)
        self._file.seek((int(self.template.offsets[item]) + start) * self._row_bytes)
        self._file.write(data.tobytes())
        if start + rows.shape[0] == length:
            self._written[item] = True

    def close(self) -> Path:
        self._file.close()
        if not self._written.all():
            missing = self.template.ids[int(np.flatnonzero(~self._written)[0])]
            self.abort()
            raise StoreError(f"{self.path}: item {missing!r} was never written")
        template = self.template
        _publish(
            self._tmp,
            self.path,
            template.ids,
            template.offsets,
            template.lengths,
            self.dtype,
            self.dim,
            int(template.lengths.sum()),
            self.attrs,
        )
        RaggedArray(self.path)  # validates sizes and index: fail here, not in the probe
        return self.path

    def abort(self) -> None:
        if not self._file.closed:
            self._file.close()
        shutil.rmtree(self._tmp, ignore_errors=True)


class RaggedArray:
    """Read-only view of a store: `store[i]` or `store.get(id)` returns a [T, D] memmap slice.

    `finite=True` checks every value once on opening (`check_finite`): for the readers whose
    results a NaN or inf would silently spoil (training, probing, extraction).
    """

    def __init__(self, path: str | Path, mode: str = "r", finite: bool = False):
        self.path = Path(path)
        meta_path = self.path / _META
        if not meta_path.is_file():
            raise StoreError(
                f"{self.path}: not a complete feature store (no {_META}); rerun the stage that writes it"
            )
        self.meta = json.loads(meta_path.read_text())
        self.dim = int(self.meta["dim"])
        self.dtype = np.dtype(self.meta["dtype"])
        self.attrs: dict = self.meta.get("attrs", {})
        ids, offsets, lengths = [], [], []
        with open(self.path / _INDEX) as f:
            for line_no, line in enumerate(f, 1):
                parts = line.rstrip("\n").split("\t")
                if len(parts) != 3:
                    raise StoreError(
                        f"{self.path / _INDEX}:{line_no}: expected 3 tab-separated fields"
                    )
                ids.append(parts[0])
                offsets.append(int(parts[1]))
                lengths.append(int(parts[2]))
        self.ids = ids
        self.offsets = np.asarray(offsets, dtype=np.int64)
        self.lengths = np.asarray(lengths, dtype=np.int64)
        rows = int(self.meta["rows"])
        if len(ids) != int(self.meta["items"]) or int(self.lengths.sum()) != rows:
            raise StoreError(f"{self.path}: index does not match {_META}")
        data_path = self.path / _DATA
        expected = rows * self.dim * self.dtype.itemsize
        if data_path.stat().st_size != expected:
            raise StoreError(
                f"{data_path}: {data_path.stat().st_size} bytes, expected {expected}; the store is truncated"
            )
        if rows == 0:
            self.data = np.zeros((0, self.dim), dtype=self.dtype)
        else:
            self.data = np.memmap(data_path, dtype=self.dtype, mode=mode, shape=(rows, self.dim))
        self._position = {item_id: i for i, item_id in enumerate(ids)}
        if finite:
            self.check_finite()

    def check_finite(self, chunk_values: int = 1 << 24) -> "RaggedArray":
        """Raise StoreError naming the store, split and first utterance holding a NaN or inf. One
        vectorised pass over the memory map, `chunk_values` at a time, so memory stays flat."""
        if self.dtype.kind != "f":
            return self
        chunk_rows = max(1, chunk_values // max(1, self.dim))
        for start in range(0, self.data.shape[0], chunk_rows):
            bad_rows = ~np.isfinite(self.data[start : start + chunk_rows]).all(axis=1)
            if bad_rows.any():
                row = start + int(np.argmax(bad_rows))
                i = int(np.searchsorted(self.offsets, row, side="right")) - 1
                raise _non_finite(self.path, self.ids[i], np.asarray(self[i]), self.dtype)
        return self

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> np.ndarray:
        start = self.offsets[i]
        return self.data[start : start + self.lengths[i]]

    def __contains__(self, item_id: str) -> bool:
        return item_id in self._position

    def get(self, item_id: str) -> np.ndarray:
        return self[self._position[item_id]]

    def __iter__(self) -> Iterator[np.ndarray]:
        for i in range(len(self)):
            yield self[i]
