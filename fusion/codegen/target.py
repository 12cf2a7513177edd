"""Compilation targets: NVPTX (sm_80, sm_90) and the host CPU."""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import llvmlite.binding as llvm

ARCHES = ("sm_80", "sm_90", "host")
PTX_VERSION = "+ptx80"  # PTX ISA 8.0: understood by ptxas >= 12.0 for sm_80 and sm_90


@lru_cache(maxsize=1)
def init_llvm() -> None:
    # llvm.initialize() raises on llvmlite >= 0.44; these are the calls that are needed.
    llvm.initialize_all_targets()
    llvm.initialize_all_asmprinters()


@dataclass(frozen=True)
class Target:
    arch: str  # "sm_80" | "sm_90" | "host"

    @property
    def is_gpu(self) -> bool:
        return self.arch != "host"

    @property
    def triple(self) -> str:
        return "nvptx64-nvidia-cuda" if self.is_gpu else llvm.get_process_triple()

    @property
    def cpu(self) -> str:
        return self.arch if self.is_gpu else llvm.get_host_cpu_name()

    @property
    def features(self) -> str:
        return PTX_VERSION if self.is_gpu else llvm.get_host_cpu_features().flatten()

    def machine(self) -> llvm.TargetMachine:
        """A shared target machine for emitting code (never hand it to an engine)."""
        init_llvm()
        return _machine(self.triple, self.cpu, self.features, self.is_gpu)

    def new_machine(self) -> llvm.TargetMachine:
        """A fresh target machine: an execution engine takes ownership of the one it gets."""
        init_llvm()
        return _machine.__wrapped__(self.triple, self.cpu, self.features, self.is_gpu)

    def has_feature(self, name: str) -> bool:
        """Host: whether the CPU has an LLVM feature (e.g. "avx512vnni")."""
        return not self.is_gpu and f"+{name}" in self.features.split(",")

    def fingerprint(self) -> str:
        """Everything about the target that changes generated code (part of cache keys)."""
        return f"{self.triple}|{self.cpu}|{self.features}"


@lru_cache(maxsize=8)
def _machine(triple: str, cpu: str, features: str, gpu: bool) -> llvm.TargetMachine:
    target = llvm.Target.from_triple(triple)
    return target.create_target_machine(cpu=cpu, features=features, opt=3,
                                        reloc="default",
                                        codemodel="default" if gpu else "jitdefault")


def parse_arch(arch: str) -> Target:
    if arch not in ARCHES:
        raise ValueError(f"unknown arch {arch!r}; expected one of {', '.join(ARCHES)}")
    return Target(arch)


HOST = Target("host")
