"""Zero tensors whose memory the OS commits page by page as they are written, and gives back on request.

A KV cache sized for its worst case (every slot at the full context) would reserve RAM no request may ever use:
16 slots x 32K tokens of a 135M model's bf16 keys and values are 12 GiB. vAttention (Prabhu et al., 2024,
"vAttention: Dynamic Memory Management for Serving LLMs without PagedAttention") keeps the contiguous layout
every kernel reads and lets virtual memory do the paging: reserve address space for the worst case, commit
physical pages on demand. On a CPU that needs no driver: a private anonymous mapping with MAP_NORESERVE costs
no RAM until a page is written, and every page reads as zeros until then (the cache's "no 0 * NaN from
uninitialised memory" invariant holds for free). `release` hands a finished row's pages back with
madvise(MADV_DONTNEED), after which they read as zeros again. Granularity: one 4 KiB page of each
[slots, head_dim] span a write touches, i.e. 16-32 tokens of one layer's head.

Where no such mapping can be made (not Linux or macOS, an mmap failure, a strict overcommit policy refusing
the reservation, a non-CPU device) `lazy_zeros` is torch.zeros, said once in a warning, and `release` does
nothing: callers then size buffers to what they need (engine.Engine._ensure_cache grows them).
"""

from __future__ import annotations

import ctypes
import functools
import mmap
import sys
import warnings
import weakref

import torch

PAGE = mmap.PAGESIZE
_FLAGS = (getattr(mmap, "MAP_PRIVATE", 0) | getattr(mmap, "MAP_ANONYMOUS", 0)
          | getattr(mmap, "MAP_NORESERVE", 0))
# the mapping behind each lazy tensor's storage, by the storage's address (weak: gone with the storage)
_maps: "weakref.WeakValueDictionary[int, mmap.mmap]" = weakref.WeakValueDictionary()
_warned = False


@functools.cache
def available() -> bool:
    """Whether lazy_zeros can reserve address space here: anonymous mappings and madvise, and (Linux) an overcommit
    policy other than 2, "never", which counts every reservation against RAM + swap."""
    if sys.platform == "win32" or not hasattr(mmap, "MADV_DONTNEED") or not hasattr(mmap, "MAP_ANONYMOUS"):
        return False
    try:
        with open("/proc/sys/vm/overcommit_memory") as f:
            return f.read().strip() != "2"
    except OSError:  # not Linux: macOS commits anonymous pages on first touch too
        return True


def lazy_zeros(shape: tuple[int, ...], dtype: torch.dtype, device: str | torch.device = "cpu") -> torch.Tensor:
    """A contiguous zero tensor of `shape` whose pages cost RAM only once written (see the module docstring)."""
    global _warned
    n = 1
    for s in shape:
        n *= int(s)
    nbytes = n * torch.empty((), dtype=dtype).element_size()
    if nbytes == 0 or torch.device(device).type != "cpu" or not available():
        return torch.zeros(shape, dtype=dtype, device=device)
    size = -(-nbytes // PAGE) * PAGE
    try:
        m = mmap.mmap(-1, size + PAGE, flags=_FLAGS)
    except (OSError, ValueError) as e:
        if not _warned:
            warnings.warn(f"lazy_zeros: no lazily committed mapping of {nbytes} bytes ({e}); "
                          "KV caches are allocated in full", RuntimeWarning, stacklevel=2)
            _warned = True
        return torch.zeros(shape, dtype=dtype, device=device)
    if hasattr(mmap, "MADV_NOHUGEPAGE"):
        # 4 KiB pages, never 2 MiB ones (a transparent huge page would commit 2 MiB at a span's first token); the
        # flag also keeps the kernel from merging the mapping with glibc's arenas, so committed_bytes sees only it
        m.madvise(mmap.MADV_NOHUGEPAGE)
    _guard(m, size)
    t = torch.frombuffer(m, dtype=dtype, count=n).view(shape)  # the tensor's storage keeps the mapping alive
    _maps[t.untyped_storage().data_ptr()] = m
    return t


def _guard(m: mmap.mmap, offset: int) -> None:
    """Make the page at `offset` (one past the tensor's pages) inaccessible. Two lazy mappings side by side with
    equal flags would otherwise be merged by the kernel into one region, whose Rss committed_bytes would then
    count for both; a PROT_NONE page between them keeps every mapping its own region."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        buf = ctypes.c_char.from_buffer(m, offset)
        libc.mprotect(ctypes.c_void_p(ctypes.addressof(buf)), ctypes.c_size_t(PAGE), 0)  # PROT_NONE
        del buf  # the buffer export; the mapping stays
    except (OSError, AttributeError, TypeError, ValueError):
        pass  # no guard: committed_bytes may then count a merged neighbour too


def is_lazy(t: torch.Tensor) -> bool:
    return t.device.type == "cpu" and t.untyped_storage().data_ptr() in _maps


def release(t: torch.Tensor) -> None:
    """Give back the pages lying wholly inside the memory of `t` (a view into a lazy_zeros tensor); they read as
    zeros afterwards. No-op for other tensors. Non-contiguous views are released run by run along dim 0."""
    if t.numel() == 0 or not is_lazy(t):
        return
    if not t.is_contiguous():
        for part in t:
            release(part)
        return
    m = _maps.get(t.untyped_storage().data_ptr())
    if m is None:
        return
    start = t.data_ptr() - t.untyped_storage().data_ptr()  # byte offset in the mapping (page-aligned base)
    lo = -(-start // PAGE) * PAGE
    hi = (start + t.numel() * t.element_size()) // PAGE * PAGE
    if hi > lo:
        m.madvise(mmap.MADV_DONTNEED, lo, hi - lo)


def committed_bytes(tensors) -> int | None:
    """RAM the kernel has committed to the mappings under `tensors` (lazy_zeros tensors or views into them): the
    Rss of each distinct mapping holding one, from /proc/self/smaps (Linux; None elsewhere). Pages only read
    map the shared zero page and do not count. Each mapping ends in a guard page (_guard), so the kernel never
    merges two of them into one region."""
    addrs = {t.untyped_storage().data_ptr() for t in tensors if is_lazy(t)}
    try:
        with open("/proc/self/smaps") as f:
            lines = f.readlines()
    except OSError:
        return None
    total, inside = 0, False
    for line in lines:
        head = line.split(maxsplit=1)[0]
        if "-" in head and not head.endswith(":"):  # a region's header: start-end perms offset dev inode [path]
            lo, hi = (int(x, 16) for x in head.split("-"))
            inside = any(lo <= a < hi for a in addrs)
        elif inside and head == "Rss:":
            total += int(line.split()[1]) * 1024
    return total
