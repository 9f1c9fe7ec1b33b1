"""glibc's memory settings for training on a CPU: keep freed memory in the process.

By default glibc hands every freed block of more than 32 MB back to the kernel, so the next training step faults it
in again, 4 KB at a time (an AFT-local step at T = 16384 spent 10.6 of its 14.3 s in the kernel). With
`keep_freed_memory()` large blocks come from the heap and freed memory stays in the process, as jemalloc or tcmalloc
would keep it; the process's resident memory then stays at its peak. Measured by benchmarks/benchmark_training.py
(README, "Training against the floor"): as fast or faster, within run-to-run noise, for every model at T = 4096
and T = 16384 (AFT at 16k tokens by 17-34% over two runs).
The same from the shell: MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=68719476736.
"""

import ctypes
import platform

M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # glibc's mallopt parameters


def keep_freed_memory() -> bool:
    """Apply the setting to this process (allocations from now on); False where it does not apply (not glibc)."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL("libc.so.6")
    # mallopt returns 1 on success
    return bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(libc.mallopt(M_TRIM_THRESHOLD, -1))
