"""Environment every process coserve starts gets (no torch import here: the launcher and the
GPU strategies read it too). NVLink multicast (NCCL's NVLS, torch symmetric memory's
multimem, NVSHMEM's NVLS) stays off: on the lent multi-GPU machines a program that uses it
can take the host's GPUs out of service."""

from __future__ import annotations

NO_MULTICAST_ENV: dict[str, str] = {
    "NCCL_NVLS_ENABLE": "0",
    "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
    "NVSHMEM_DISABLE_NVLS": "1",
}

# A tensor-parallel group lives on one host, so NCCL's bootstrap and proxy sockets have no
# reason to listen beyond loopback; by default NCCL picks the first non-loopback interface.
# Set with setdefault: a user's own NCCL_SOCKET_IFNAME wins.
LOOPBACK_SOCKET_ENV: dict[str, str] = {"NCCL_SOCKET_IFNAME": "lo"}
# The variables that can put those sockets (NCCL's, and gloo's on CPU ranks) elsewhere.
SOCKET_IFNAME_VARS = ("NCCL_SOCKET_IFNAME", "GLOO_SOCKET_IFNAME")
