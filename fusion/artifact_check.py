"""Structural checks of a cached artifact before it reaches the JIT linker or the CUDA driver.

The cache's checksum catches a bad disk, not a payload rewritten with its checksum
recomputed; LLVM's runtime linker aborts the process (or crashes) on a malformed object
file instead of raising. So a host object must be a well-formed ELF relocatable for this
machine whose tables stay inside the file, that defines the kernel's function and needs
only symbols the process has; PTX must declare its version, this target and the kernel's
entry. Code bytes themselves cannot be checked: that is the checksum's job.
"""
from __future__ import annotations

import ctypes
import platform
import re
import struct
from dataclasses import dataclass

from fusec.fusion.codegen.target import Target


class InvalidArtifact(ValueError):
    """A cache payload that must not be loaded."""


ELF_MACHINES = {"x86_64": 62, "amd64": 62, "aarch64": 183, "arm64": 183}  # platform.machine() -> e_machine
# Relocation types (-> bytes written) that LLVM's runtime linker implements, where known;
# an unknown one aborts it. Other machines get only the bounds checks.
RELOCATIONS = {62: {0: 0, 1: 8, 2: 4, 4: 4, 9: 4, 10: 4, 11: 4, 24: 8, 41: 4, 42: 4}}
SHT_SYMTAB, SHT_STRTAB, SHT_RELA, SHT_NOBITS, SHT_REL = 2, 3, 4, 8, 9
SHN_LORESERVE, SHN_ABS, SHN_COMMON = 0xFF00, 0xFFF1, 0xFFF2
SHF_TLS, STT_FUNC, STT_TLS, STT_GNU_IFUNC = 0x400, 2, 6, 10  # the runtime linker aborts on TLS


@dataclass(frozen=True)
class _Section:
    type: int
    flags: int
    offset: int
    size: int
    link: int
    info: int
    entsize: int

    def data(self, obj: bytes) -> bytes:
        return obj[self.offset:self.offset + self.size]


def check_artifact(data: bytes, name: str, target: Target) -> None:
    """Raise InvalidArtifact unless `data` is loadable code for kernel `name` on `target`."""
    if target.is_gpu:
        check_ptx(data, name, target.arch)
    else:
        check_host_object(data, name)


def check_ptx(data: bytes, name: str, arch: str) -> None:
    try:
        text = data.decode("ascii")
    except UnicodeDecodeError:
        raise InvalidArtifact("PTX is not ASCII text") from None
    for what, pattern in ((".version", r"^\s*\.version\s+\d+\.\d+\s*$"), (".target", rf"^\s*\.target\s+{arch}\b"),
                          (f".entry {name}", rf"\.entry\s+{re.escape(name)}\s*\(")):
        if not re.search(pattern, text, re.MULTILINE):
            raise InvalidArtifact(f"PTX lacks {what}")


def _string(table: bytes, at: int) -> bytes:
    end = table.find(b"\0", at)
    if at >= len(table) or end < 0:
        raise InvalidArtifact("string outside its table")
    return table[at:end]


def _in_process(symbol: str) -> bool:
    """Whether the JIT can resolve an external symbol (it searches the process)."""
    return hasattr(ctypes.CDLL(None), symbol)


def check_host_object(obj: bytes, name: str) -> None:
    if len(obj) < 64 or obj[:4] != b"\x7fELF":
        raise InvalidArtifact("not an ELF file")
    if obj[4] != 2 or obj[5] != 1:
        raise InvalidArtifact("not a 64-bit little-endian ELF file")
    e_type, machine, *_, shoff, _flags, _eh, _ph, _phn, shentsize, shnum, shstrndx = struct.unpack_from(
        "<HHIQQQIHHHHHH", obj, 16)
    expected = ELF_MACHINES.get(platform.machine().lower())
    if e_type != 1 or (expected is not None and machine != expected):
        raise InvalidArtifact(f"ELF type {e_type}, machine {machine}: not a relocatable object for this machine")
    if shentsize != 64 or not 0 < shnum or shoff + 64 * shnum > len(obj) or shstrndx >= shnum:
        raise InvalidArtifact("section header table out of bounds")
    sections = [_Section(*(struct.unpack_from("<IIQQQQIIQQ", obj, shoff + 64 * i)[j] for j in (1, 2, 4, 5, 6, 7, 9)))
                for i in range(shnum)]
    for s in sections:
        if s.type != SHT_NOBITS and s.offset + s.size > len(obj):
            raise InvalidArtifact("section outside the file")
        if s.flags & SHF_TLS:
            raise InvalidArtifact("thread-local section")
    symtabs = [s for s in sections if s.type == SHT_SYMTAB]
    if len(symtabs) != 1:
        raise InvalidArtifact(f"{len(symtabs)} symbol tables")
    symtab = symtabs[0]
    if symtab.entsize != 24 or symtab.size % 24 or symtab.link >= shnum or sections[symtab.link].type != SHT_STRTAB:
        raise InvalidArtifact("malformed symbol table")
    strtab, table = sections[symtab.link].data(obj), symtab.data(obj)
    defined = False
    for at in range(0, len(table), 24):
        st_name, st_info, _other, shndx, value, size = struct.unpack_from("<IBBHQQ", table, at)
        sym = _string(strtab, st_name)
        if SHN_LORESERVE > shndx >= shnum or (shndx >= SHN_LORESERVE and shndx not in (SHN_ABS, SHN_COMMON)):
            raise InvalidArtifact("symbol in no section")
        if st_info & 0xF in (STT_TLS, STT_GNU_IFUNC):
            raise InvalidArtifact("thread-local or indirect symbol")
        if shndx == 0 and sym and not _in_process(sym.decode("ascii", "replace")):
            raise InvalidArtifact(f"external symbol {sym!r} the process lacks")
        if sym == name.encode() and 0 < shndx < SHN_LORESERVE and st_info & 0xF == STT_FUNC:
            defined = value + size <= sections[shndx].size
    if not defined:
        raise InvalidArtifact(f"no function {name} defined")
    _check_relocations(obj, sections, len(table) // 24, RELOCATIONS.get(machine))


def _check_relocations(obj: bytes, sections: list[_Section], symbols: int, widths: dict[int, int] | None) -> None:
    for s in sections:
        if s.type not in (SHT_REL, SHT_RELA):
            continue
        entsize = 24 if s.type == SHT_RELA else 16
        if s.entsize != entsize or s.size % entsize or s.info >= len(sections) or s.link >= len(sections):
            raise InvalidArtifact("malformed relocation section")
        into, table = sections[s.info], s.data(obj)
        for at in range(0, len(table), entsize):
            offset, info = struct.unpack_from("<QQ", table, at)
            kind, width = info & 0xFFFFFFFF, 1
            if widths is not None:
                if kind not in widths:
                    raise InvalidArtifact(f"relocation type {kind}")
                width = widths[kind]
            if info >> 32 >= symbols or offset + width > into.size:
                raise InvalidArtifact("relocation out of bounds")
