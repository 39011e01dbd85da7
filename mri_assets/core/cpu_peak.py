"""The CPU's peak arithmetic rate, from its cores, clock and instruction set.

Benchmarks report achieved GFLOP/s against this peak (`share_of_peak`), and the `backbone`
asset turns a pretraining budget into a time estimate with it before training starts.

Peak = cores x clock x FLOPs per cycle per core, where the FLOPs per cycle follow from the
widest fused multiply-add the CPU has and how many of them it issues per cycle:

| instruction set | fp32 FLOP/cycle/core | bf16 FLOP/cycle/core |
| --- | --- | --- |
| AVX2 + FMA (2 x 256-bit FMA units) | 32 | - (no native bf16: fp32) |
| AVX-512, Intel (2 x 512-bit FMA units) | 64 | 128 with AVX-512 BF16 |
| AVX-512, AMD Zen 4 (512-bit ops on 256-bit units) | 32 | 64 with AVX-512 BF16 |
| AMX (Intel tile multiply) | as AVX-512 | 1024 |

The clock is the highest the kernel reports (`cpuinfo_max_freq`, else `cpu MHz` of
/proc/cpuinfo: a VM often shows only the nominal clock). The cores are the ones this process may
run on (`os.sched_getaffinity`). An estimate, not a measurement: turbo, thermal limits and a
second FMA port that a SKU lacks move the truth by tens of percent; the `detail` line says what
it was computed from.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class CpuPeak:
    cores: int
    ghz: float
    fp32_flops_per_cycle: int
    bf16_flops_per_cycle: int
    isa: str

    def gflops(self, precision: str = "fp32") -> float:
        per_cycle = self.bf16_flops_per_cycle if precision == "bf16" else self.fp32_flops_per_cycle
        return self.cores * self.ghz * per_cycle

    def detail(self, precision: str = "fp32") -> str:
        per_cycle = self.bf16_flops_per_cycle if precision == "bf16" else self.fp32_flops_per_cycle
        return (f"{self.cores} cores x {self.ghz:.2f} GHz x {per_cycle} {precision} FLOP/cycle "
                f"({self.isa})")


def _cpuinfo() -> tuple[set[str], str, float]:
    flags: set[str] = set()
    vendor, mhz = "", 0.0
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return flags, vendor, mhz
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "flags" and not flags:
            flags = set(value.split())
        elif key == "vendor_id" and not vendor:
            vendor = value.strip()
        elif key == "cpu MHz" and not mhz:
            mhz = float(value)
    return flags, vendor, mhz


def _max_ghz(fallback_mhz: float) -> float:
    path = Path("/sys/devices/system/cpu/cpu0/cpufreq/cpuinfo_max_freq")
    try:
        return int(path.read_text()) / 1e6
    except (OSError, ValueError):
        return (fallback_mhz or 2000.0) / 1000


def peak_from_flags(flags: set[str], vendor: str, ghz: float, cores: int) -> CpuPeak:
    """The peak of a CPU with these /proc/cpuinfo `flags` (pure: tested with made-up CPUs)."""
    amd = vendor == "AuthenticAMD"
    if "avx512f" in flags:
        fp32 = 32 if amd else 64
        isa = "AVX-512 on 256-bit units (AMD)" if amd else "AVX-512, 2 FMA units"
    elif "avx2" in flags and "fma" in flags:
        fp32, isa = 32, "AVX2 + FMA"
    elif "avx" in flags:
        fp32, isa = 16, "AVX"
    else:
        fp32, isa = 8, "SSE"
    if "amx_bf16" in flags:
        bf16, isa = 1024, isa + " + AMX"
    elif "avx512_bf16" in flags:
        bf16, isa = 2 * fp32, isa + " + AVX-512 BF16"
    else:
        bf16 = fp32
    return CpuPeak(cores, ghz, fp32, bf16, isa)


def _capped(flags: set[str], max_isa: str) -> set[str]:
    """The flags oneDNN may use under `ONEDNN_MAX_CPU_ISA` (e.g. `AVX2` on an AVX-512 CPU, how
    the fp32 path of AVX2-only machines is measured on a newer one)."""
    cap = max_isa.strip().upper()
    if cap.startswith(("AVX2", "AVX_VNNI", "SSE", "AVX")) and not cap.startswith("AVX512"):
        flags = {f for f in flags if not f.startswith(("avx512", "amx"))}
    if cap.startswith("AVX512_CORE") and "AMX" not in cap:
        flags = {f for f in flags if not f.startswith("amx")}
    return flags


def cpu_peak(max_isa: str | None = None) -> CpuPeak:
    """This machine's peak, for the cores this process may use and, when given, the instruction
    set oneDNN was capped at (the value of `ONEDNN_MAX_CPU_ISA`, which the caller reads)."""
    flags, vendor, mhz = _cpuinfo()
    if max_isa:
        flags = _capped(flags, max_isa)
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    return peak_from_flags(flags, vendor, _max_ghz(mhz), cores)
