"""FAISS vector index over text chunks, and its versioned, atomically written on-disk store."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import secrets
import shutil
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal, get_args

import numpy as np

IndexKind = Literal["flat", "hnsw"]
KINDS: tuple[str, ...] = get_args(IndexKind)
_HNSW_M = 32
_HNSW_EF_CONSTRUCTION = 200
_HNSW_EF_SEARCH = 64
# 2: chunks carry tags and category (LLM metadata); format 1 versions still load, without them.
_FORMAT = 2
_VERSION_RE = re.compile(r"^v\d{8}T\d{12}Z-[0-9a-f]{6}$")
_CURRENT = "CURRENT"
_TMP_PREFIX = ".tmp-"
# A temp dir this old cannot belong to a save still in progress; it is a crashed one's leftovers.
_STALE_TMP_S = 3600.0


@dataclass(frozen=True)
class Chunk:
    id: str
    title: str
    source: str
    text: str
    # Its document's metadata (retrieval.metadata); empty where none was extracted.
    tags: tuple[str, ...] = ()
    category: str | None = None


@dataclass(frozen=True)
class Hit:
    id: str
    title: str
    source: str
    score: float
    text: str
    tags: tuple[str, ...] = ()
    category: str | None = None


def chunk_id(source: str, position: int, text: str) -> str:
    """A stable id: the same chunk of the same source always gets the same id across rebuilds."""
    digest = hashlib.sha256(f"{source}\x00{position}\x00{text}".encode()).hexdigest()
    return digest[:20]


_version_lock = threading.Lock()
_last_version_ts = 0


def new_version() -> str:
    """A unique version string that sorts in creation order (within this process, strictly)."""
    global _last_version_ts
    with _version_lock:
        # Microsecond resolution, bumped if the clock has not moved, so versions made back to back
        # (build, then with_added) still sort in order.
        now_us = max(time.time_ns() // 1000, _last_version_ts + 1)
        _last_version_ts = now_us
    stamp = datetime.fromtimestamp(now_us / 1_000_000, tz=UTC).strftime("%Y%m%dT%H%M%S")
    return f"v{stamp}{now_us % 1_000_000:06d}Z-{secrets.token_hex(3)}"


class VectorIndex:
    """An immutable set of chunks and their embeddings; search is safe from many threads.

    Nothing mutates a VectorIndex after construction: `with_added` returns a new object, so a
    reader holding the old one keeps consistent results while a new version is swapped in.
    """

    def __init__(self, faiss_index: Any, chunks: list[Chunk], *, kind: str, version: str, dim: int):
        if faiss_index.ntotal != len(chunks):
            raise ValueError(f"index holds {faiss_index.ntotal} vectors but {len(chunks)} chunks")
        self._index = faiss_index
        self.chunks = chunks
        self.kind = kind
        self.version = version
        self.dim = dim

    @classmethod
    def build(
        cls,
        chunks: list[Chunk],
        embeddings: np.ndarray,
        *,
        kind: str = "flat",
        version: str | None = None,
    ) -> VectorIndex:
        if kind not in KINDS:
            raise ValueError(f"unknown index kind {kind!r}; expected one of {KINDS}")
        vectors = _as_matrix(embeddings, len(chunks))
        faiss_index = _new_faiss_index(kind, vectors.shape[1])
        if len(vectors):
            faiss_index.add(vectors)
        version = version or new_version()
        return cls(faiss_index, list(chunks), kind=kind, version=version, dim=vectors.shape[1])

    def search(self, query: np.ndarray, top_k: int = 5) -> list[Hit]:
        if top_k < 1:
            raise ValueError("top_k must be >= 1")
        vector = np.ascontiguousarray(query, dtype=np.float32).reshape(1, -1)
        if vector.shape[1] != self.dim:
            raise ValueError(f"query has dimension {vector.shape[1]}, index has {self.dim}")
        k = min(top_k, len(self.chunks))
        if k == 0:
            return []
        if self.kind == "hnsw":
            import faiss

            # Per-call parameters instead of setting hnsw.efSearch: no shared state is mutated.
            params = faiss.SearchParametersHNSW()
            params.efSearch = max(_HNSW_EF_SEARCH, k)
            scores, labels = self._index.search(vector, k, params=params)
        else:
            scores, labels = self._index.search(vector, k)
        hits = []
        for score, label in zip(scores[0], labels[0], strict=True):
            if label < 0:  # HNSW may find fewer than k neighbours
                continue
            chunk = self.chunks[label]
            hits.append(Hit(chunk.id, chunk.title, chunk.source, float(score), chunk.text, chunk.tags, chunk.category))
        return hits

    def with_added(self, chunks: list[Chunk], embeddings: np.ndarray) -> VectorIndex:
        """A new index (new version) holding these chunks plus ours; chunks we already hold are skipped."""
        import faiss

        vectors = _as_matrix(embeddings, len(chunks), dim=self.dim)
        seen = {chunk.id for chunk in self.chunks}
        keep: list[int] = []
        for i, chunk in enumerate(chunks):
            if chunk.id not in seen:
                seen.add(chunk.id)
                keep.append(i)
        faiss_index = faiss.clone_index(self._index)
        if keep:
            faiss_index.add(np.ascontiguousarray(vectors[keep]))
        new_chunks = self.chunks + [chunks[i] for i in keep]
        return VectorIndex(faiss_index, new_chunks, kind=self.kind, version=new_version(), dim=self.dim)

    def __len__(self) -> int:
        return len(self.chunks)

    def __repr__(self) -> str:
        return f"VectorIndex(version={self.version!r}, kind={self.kind!r}, dim={self.dim}, size={len(self)})"

    def _serialize(self) -> bytes:
        import faiss

        return faiss.serialize_index(self._index).tobytes()


def _new_faiss_index(kind: str, dim: int) -> Any:
    import faiss

    if kind == "hnsw":
        index = faiss.IndexHNSWFlat(dim, _HNSW_M, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = _HNSW_EF_CONSTRUCTION
        index.hnsw.efSearch = _HNSW_EF_SEARCH
        return index
    return faiss.IndexFlatIP(dim)


def _as_matrix(embeddings: np.ndarray, rows: int, dim: int | None = None) -> np.ndarray:
    vectors = np.ascontiguousarray(embeddings, dtype=np.float32)
    if vectors.ndim != 2 or vectors.shape[0] != rows:
        raise ValueError(f"expected embeddings of shape ({rows}, dim), got {vectors.shape}")
    if dim is not None and vectors.shape[1] != dim:
        raise ValueError(f"embeddings have dimension {vectors.shape[1]}, index has {dim}")
    if vectors.shape[1] < 1:
        raise ValueError("embeddings need at least one dimension")
    return vectors


class IndexStore:
    """Index versions as immutable directories under `root`; `root/CURRENT` names the live one.

    A version directory is written under a temporary name and renamed into place only once
    complete, and CURRENT is replaced atomically afterwards, so a reader (or a crash) never sees
    a half-written version.
    """

    def __init__(self, root: Path):
        self.root = Path(root)

    def current_version(self) -> str | None:
        try:
            version = (self.root / _CURRENT).read_text(encoding="utf-8").strip()
        except FileNotFoundError:
            return None
        return version or None

    def versions(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(
            entry.name
            for entry in self.root.iterdir()
            if _VERSION_RE.match(entry.name) and (entry / "meta.json").is_file()
        )

    def load(self, version: str | None = None) -> VectorIndex:
        import faiss

        if version is None:
            version = self.current_version()
            if version is None:
                raise FileNotFoundError(
                    f"no index in {self.root} (no {_CURRENT} file); build one with `abloop index build`"
                )
        if not _VERSION_RE.match(version):
            raise ValueError(f"not an index version: {version!r}")
        directory = self.root / version
        meta_path = directory / "meta.json"
        if not meta_path.is_file():
            raise FileNotFoundError(f"index version {version} not found in {self.root}")
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        chunks = _read_chunks(directory / "chunks.jsonl")
        faiss_index = faiss.read_index(str(directory / "index.faiss"))
        return VectorIndex(faiss_index, chunks, kind=meta["kind"], version=version, dim=int(meta["dim"]))

    def save(self, index: VectorIndex) -> str:
        self.root.mkdir(parents=True, exist_ok=True)
        final = self.root / index.version
        if not (final / "meta.json").is_file():
            self._write_version(index, final)
        self._point_current_at(index.version)
        return index.version

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Exclusive across processes and threads: flock is per open file description."""
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / ".lock", "a+b") as handle:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle.fileno(), fcntl.LOCK_UN)

    def _write_version(self, index: VectorIndex, final: Path) -> None:
        self._remove_stale_temp_dirs()
        tmp = self.root / f"{_TMP_PREFIX}{index.version}-{secrets.token_hex(4)}"
        tmp.mkdir()
        try:
            _write_file(tmp / "index.faiss", index._serialize())
            _write_file(tmp / "chunks.jsonl", _chunks_jsonl(index.chunks))
            # meta.json last: its presence is what marks a version directory complete.
            _write_file(tmp / "meta.json", _meta_json(index))
            _fsync_dir(tmp)
            os.rename(tmp, final)
            _fsync_dir(self.root)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    def _point_current_at(self, version: str) -> None:
        tmp = self.root / f"{_TMP_PREFIX}{_CURRENT}-{secrets.token_hex(4)}"
        try:
            _write_file(tmp, f"{version}\n".encode())
            os.replace(tmp, self.root / _CURRENT)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        _fsync_dir(self.root)

    def _remove_stale_temp_dirs(self) -> None:
        cutoff = time.time() - _STALE_TMP_S
        for entry in self.root.glob(f"{_TMP_PREFIX}*"):
            with contextlib.suppress(OSError):
                if entry.stat().st_mtime < cutoff:
                    if entry.is_dir():
                        shutil.rmtree(entry, ignore_errors=True)
                    else:
                        entry.unlink()


def _chunks_jsonl(chunks: list[Chunk]) -> bytes:
    lines = (json.dumps(asdict(chunk), ensure_ascii=False) for chunk in chunks)
    return "".join(f"{line}\n" for line in lines).encode("utf-8")


def _read_chunks(path: Path) -> list[Chunk]:
    with open(path, encoding="utf-8") as handle:
        return [_chunk(json.loads(line)) for line in handle if line.strip()]


def _chunk(record: dict[str, Any]) -> Chunk:
    # Format 1 lines have no tags or category: the defaults stand in.
    return Chunk(id=record["id"], title=record["title"], source=record["source"], text=record["text"],
                 tags=tuple(record.get("tags") or ()), category=record.get("category"))


def _meta_json(index: VectorIndex) -> bytes:
    meta = {
        "format": _FORMAT,
        "version": index.version,
        "kind": index.kind,
        "dim": index.dim,
        "count": len(index),
        "created_at": datetime.now(UTC).isoformat(),
    }
    return json.dumps(meta, indent=2).encode("utf-8")


def _write_file(path: Path, data: bytes) -> None:
    with open(path, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
