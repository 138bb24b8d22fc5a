"""The x86 CPU features that decide how ONNX Runtime's 8-bit kernels add up products, read from ``/proc/cpuinfo``.

ONNX Runtime multiplies unsigned 8-bit activations by signed 8-bit weights. With VNNI (``avx512_vnni`` or
``avx_vnni``) each product is accumulated in 32 bits; without it (AVX2, or AVX-512 without VNNI) each pair of
products is summed in 16 bits first and can saturate, which only 7-bit weights rule out. An 8-bit accuracy check is
therefore only as good as the CPU it ran on: the export records these flags next to its figures.
"""

from __future__ import annotations

import platform
from pathlib import Path

CPU_FEATURES = ("avx2", "avx512f", "avx512_vnni", "avx_vnni")
CPUINFO = Path("/proc/cpuinfo")


def cpu_features(cpuinfo: Path = CPUINFO) -> dict[str, bool | str]:
    """``{"avx2": bool, "avx512f": bool, "avx512_vnni": bool, "avx_vnni": bool, "cpu": model name}`` of this machine.

    Read from the first ``flags`` line of ``cpuinfo`` (Linux); every feature is ``"unknown"`` where that file cannot
    be read or has no ``flags`` line (macOS, Windows, ARM), since guessing from the platform name would be wrong as
    often as right. ``cpu`` is the ``model name`` line, else :func:`platform.processor`, else ``"unknown"``.
    """
    try:
        lines = cpuinfo.read_text(errors="replace").splitlines()
    except OSError:
        lines = []
    fields: dict[str, str] = {}
    for line in lines:
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())  # the first processor's lines: all cores share the flags
    flags = set(fields["flags"].split()) if "flags" in fields else None
    features: dict[str, bool | str] = {
        name: "unknown" if flags is None else name in flags for name in CPU_FEATURES
    }  # fmt: skip
    features["cpu"] = fields.get("model name") or platform.processor() or "unknown"
    return features


def has_vnni(features: dict[str, bool | str]) -> bool | str:
    """Whether ``features`` (of :func:`cpu_features`) name a VNNI CPU: ``True``, ``False`` or ``"unknown"``."""
    values = [features.get("avx512_vnni", "unknown"), features.get("avx_vnni", "unknown")]
    if True in values:
        return True
    return "unknown" if "unknown" in values else False
