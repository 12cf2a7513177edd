"""Content-addressed kernel cache on disk.

key = SHA-256 over what determines the artifact (see fusion.compiler: the kernel's
specialisation and generator source, the target's triple, CPU and features, the
compile options, the llvmlite / LLVM / fusec versions). Each entry stores a header
with the SHA-256 of its payload, so a truncated or corrupted file is detected,
discarded and rebuilt, never loaded; so is a payload the caller's check rejects
(fusion.artifact_check: one rewritten with its checksum recomputed). Writes go to a
temporary file in the same folder and are renamed into place, so concurrent compiles
never see a torn file.
"""
from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import llvmlite
import llvmlite.binding as llvm

from fusec import __version__

log = logging.getLogger(__name__)
MAGIC = b"FUSEC-ARTIFACT 1\n"


def default_cache_dir() -> Path:
    env = os.environ.get("FUSEC_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or "~/.cache"
    return Path(base).expanduser() / "fusec"


def artifact_key(source: str, target_fingerprint: str, options: str = "") -> str:
    h = hashlib.sha256()
    for part in (source, target_fingerprint, options, llvmlite.__version__,
                 ".".join(map(str, llvm.llvm_version_info)), __version__):
        h.update(part.encode())
        h.update(b"\0")
    return h.hexdigest()


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    corrupt: int = 0
    hit_names: list[str] = field(default_factory=list)
    miss_names: list[str] = field(default_factory=list)


class KernelCache:
    def __init__(self, root: Path | None = None) -> None:
        self.root = Path(root) if root is not None else default_cache_dir()
        self.stats = CacheStats()

    def path(self, key: str, suffix: str) -> Path:
        return self.root / key[:2] / f"{key}{suffix}"

    def get_or_build(self, key: str, suffix: str, build: Callable[[], bytes], label: str = "",
                     check: Callable[[bytes], None] | None = None) -> bytes:
        """The entry's payload, or build()'s, stored. `check` raises ValueError for a
        payload that passes the checksum but must not be loaded; it is rebuilt."""
        path = self.path(key, suffix)
        payload = self._read(path)
        if payload is not None and check is not None:
            try:
                check(payload)
            except ValueError as e:
                payload = self._discard(path, str(e))
        if payload is not None:
            self.stats.hits += 1
            self.stats.hit_names.append(label or key)
            return payload
        self.stats.misses += 1
        self.stats.miss_names.append(label or key)
        payload = build()
        self._write(path, payload)
        return payload

    def _read(self, path: Path) -> bytes | None:
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as e:  # unreadable: rebuild rather than fail
            log.warning("cannot read cache entry %s (%s)", path, e)
            return None
        header_end = len(MAGIC) + 65
        if data[: len(MAGIC)] == MAGIC and len(data) >= header_end:
            digest, payload = data[len(MAGIC): header_end - 1].decode("ascii", "replace"), data[header_end:]
            if hashlib.sha256(payload).hexdigest() == digest:
                return payload
        return self._discard(path, "checksum mismatch")

    def _discard(self, path: Path, why: str) -> None:
        """Delete a corrupt entry (the caller rebuilds it). One warning per cache: a bad
        cache has many such entries, and stats.corrupt counts them all."""
        self.stats.corrupt += 1
        if self.stats.corrupt == 1:
            log.warning("kernel cache %s: corrupt entry %s (%s) rebuilt; further corrupt entries are rebuilt "
                        "without a warning", self.root, path.name, why)
        else:
            log.debug("discarding corrupt cache entry %s (%s)", path, why)
        try:
            path.unlink(missing_ok=True)
        except OSError:
            pass
        return None

    def _write(self, path: Path, payload: bytes) -> None:
        """Store an entry; a cache that cannot be written only costs a rebuild next time."""
        data = MAGIC + hashlib.sha256(payload).hexdigest().encode() + b"\n" + payload
        tmp = None
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.chmod(tmp, 0o644)  # mkstemp makes 0600; a shared cache is read by others
            os.replace(tmp, path)
        except OSError as e:
            log.warning("cannot write cache entry %s (%s)", path, e)
            if tmp is not None:
                Path(tmp).unlink(missing_ok=True)
