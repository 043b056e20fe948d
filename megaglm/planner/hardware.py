"""GPU figures the planner needs: memory, dense peak (from :data:`megaglm.training.flops.PEAK_TFLOPS`) and
link bandwidths.

Memory is the capacity the vendor sells, in GB (10^9 bytes; an "80 GB" H100 reports 81,559 MiB, so this
is slightly conservative). Link bandwidths are per GPU and per direction, from the vendors' datasheets
(NVLink 3 on A100: 600 GB/s bidirectional; NVLink 4 on H100 / H200: 900 GB/s; NVLink 5 on B200: 1.8 TB/s;
PCIe Gen5 x16: 64 GB/s per direction), times :data:`LINK_EFFICIENCY`, the fraction a ring collective
reaches in practice (an assumption, stated). Between nodes the default is one 400 Gb/s NIC per GPU
(50 GB/s), ``--inter-node-gbps`` to change it.
"""

from __future__ import annotations

from dataclasses import dataclass

from megaglm.training.flops import PEAK_TFLOPS, gpu_kind

__all__ = ["GpuSpec", "GPUS", "LINK_EFFICIENCY", "resolve_gpu", "gpu_names"]

LINK_EFFICIENCY = 0.8  # achieved / datasheet bandwidth of ring all-reduce / all-gather (assumption)


@dataclass(frozen=True)
class GpuSpec:
    """One GPU model.

    Attributes:
        kind: key in :data:`megaglm.training.flops.PEAK_TFLOPS`. label: display name.
        memory_gb: capacity, GB (1e9 bytes). intra_node_gbs: datasheet per-direction bandwidth to the other
            GPUs of its node, GB/s. inter_node_gbits: default NIC bandwidth per GPU, Gb/s.
        peak_tflops: dense TFLOP/s by precision (bf16, fp8, fp32), None where unsupported.
    """

    kind: str
    label: str
    memory_gb: float
    intra_node_gbs: float
    inter_node_gbits: float

    @property
    def peak_tflops(self) -> dict:
        """Dense peak TFLOP/s per precision (the FLOPs module's table)."""
        return PEAK_TFLOPS[self.kind]


GPUS: dict[str, GpuSpec] = {
    "h100_sxm": GpuSpec("h100_sxm", "H100 SXM", 80.0, 450.0, 400.0),
    "h100_pcie": GpuSpec("h100_pcie", "H100 PCIe", 80.0, 64.0, 400.0),
    "h200": GpuSpec("h200", "H200 SXM", 141.0, 450.0, 400.0),
    "h200_nvl": GpuSpec("h200_nvl", "H200 NVL", 141.0, 64.0, 400.0),
    "a100": GpuSpec("a100", "A100 SXM", 80.0, 300.0, 200.0),
    "b200": GpuSpec("b200", "B200", 180.0, 900.0, 400.0),
}


def gpu_names() -> list[str]:
    """Accepted ``--gpu`` names: the table's keys and the short names ``h100``, ``h200``, ``a100``, ``b200``."""
    return sorted(set(GPUS) | {"h100", "h200", "a100", "b200"})


def resolve_gpu(name: str) -> GpuSpec:
    """The :class:`GpuSpec` for a name such as ``h100``, ``H100 SXM``, ``h200``, ``a100`` or ``b200``.

    Raises:
        ValueError: an unknown GPU; the message lists the accepted names.
    """
    key = str(name).strip().lower().replace("-", "_").replace(" ", "_")
    if key not in GPUS:
        key = gpu_kind(str(name)) or ""
    if key not in GPUS:
        raise ValueError(f"unknown GPU {name!r}; known: {', '.join(gpu_names())}")
    return GPUS[key]
