"""Device table for the analytic cost model.

Peaks are dense bf16 tensor-core FLOP/s from vendor data sheets; ``efficiency`` is the fraction of
peak a large GEMM-bound layer reaches; ``launch_s`` is the per-kernel latency that makes small
per-device work inefficient: the floor of one framework op (host dispatch plus launch, about 8 us
on A100-class hosts in eager PyTorch and megatron-core, 6 us on H100-class hosts), charged per
forward kernel and again per backward kernel; link bandwidths are per direction. The CPU row describes one worker
process with one thread on this kind of machine and is meant to be replaced by a profiled cost
model (``loom profile``). Memory bandwidth (what a decode step of a generate use is bound by, planner.generation):
H100 SXM 3.35 TB/s, A100/A800 80GB 2.0 TB/s, H200 4.8 TB/s (data sheets); the CPU row's 9 GB/s is measured as a
decode step reads: ``F.linear`` at one row through every weight matrix of a 4-layer llama (hidden 512, 29 matrices of
1-16 MB, 71 MB in all, not cache-resident between steps), one thread, fp32, CPU time: 9.2 GB/s on this machine (AMD
EPYC, 2 cores, load 8). One large matrix-vector product (8192 x 4096) reads at 14-20 GB/s, which a model's many
smaller matrices do not reach (the row's earlier 15 GB/s came from that one product and priced decoding at about
half the measured time: bench/results/generation.md).
"""

from __future__ import annotations

from dataclasses import dataclass

from planner.errors import SpecError, did_you_mean
from planner.spec import ClusterSpec

GIB = 1024**3


@dataclass(frozen=True)
class DeviceInfo:
    """Performance facts of one device kind; bandwidths in bytes/s, memory in bytes."""

    name: str
    peak_flops: float
    efficiency: float
    mem_bandwidth: float
    memory_bytes: float
    launch_s: float
    intra_node_bandwidth: float  # bytes/s, per device, per direction
    intra_latency_s: float
    inter_latency_s: float
    # whether a collective progresses while the device computes: a GPU's NCCL runs on SMs and copy engines of its own
    # beside the compute stream; a CPU worker's gloo all-reduce or all-gather needs the one core the worker computes
    # on (two gloo processes, pinned: an all-reduce launched before 1 ms of compute on both cores still had most of its
    # time to go after it; session 24), so a bucket's all-reduce, and ZeRO-1's all-gather, wait for compute to end
    overlaps_collectives: bool = True


DEVICES: dict[str, DeviceInfo] = {
    "a100": DeviceInfo("a100", 312e12, 0.60, 2.0e12, 80 * GIB, 8e-6, 300e9, 5e-6, 1e-5),
    "a800": DeviceInfo("a800", 312e12, 0.60, 2.0e12, 80 * GIB, 8e-6, 200e9, 5e-6, 1e-5),
    "h100": DeviceInfo("h100", 989e12, 0.55, 3.35e12, 80 * GIB, 6e-6, 450e9, 4e-6, 8e-6),
    "h200": DeviceInfo("h200", 989e12, 0.55, 4.8e12, 141 * GIB, 6e-6, 450e9, 4e-6, 8e-6),
    "cpu": DeviceInfo("cpu", 1.0e11, 0.5, 9e9, 8 * GIB, 2e-5, 5e9, 5e-5, 1e-4, overlaps_collectives=False),
}


@dataclass(frozen=True)
class Hardware:
    """A cluster resolved against the device table: the numbers every cost model uses."""

    device: DeviceInfo
    num_nodes: int
    devices_per_node: int
    memory_bytes: float
    intra_bandwidth: float
    inter_bandwidth: float  # bytes/s per node

    @property
    def num_devices(self) -> int:
        return self.num_nodes * self.devices_per_node


def resolve_hardware(cluster: ClusterSpec) -> Hardware:
    """Combine a ClusterSpec with the device table; an unknown device kind is a SpecError."""
    if cluster.device not in DEVICES:
        raise SpecError(f"cluster.device ('{cluster.device}') is not a known device; {did_you_mean(cluster.device, DEVICES)}")
    dev = DEVICES[cluster.device]
    return Hardware(
        device=dev,
        num_nodes=cluster.num_nodes,
        devices_per_node=cluster.devices_per_node,
        memory_bytes=cluster.memory_gib * GIB if cluster.memory_gib else dev.memory_bytes,
        intra_bandwidth=cluster.intra_node_gbps * 1e9 / 8 if cluster.intra_node_gbps else dev.intra_node_bandwidth,
        inter_bandwidth=cluster.inter_node_gbps * 1e9 / 8,
    )
