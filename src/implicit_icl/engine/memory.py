"""Freed CPU memory kept in the process instead of faulted in again at every pass (glibc's malloc).

glibc serves a block over its mmap threshold with a fresh mapping, and gives the top of its heap back to the
system once more than twice that threshold is free there. The threshold starts at 128 KiB and rises only when a
mapped block larger than it is freed (to that block's size, at most 32 MiB on 64-bit systems). A pass whose
temporaries outgrow twice the largest block the process has freed so far — the one-pass dynamics, ~24 MB at
n = 256 on the benchmark's model — then touches fresh pages every time it runs: ~6,000 minor faults per pass,
~15% of its time (benchmarks.md), while a loop of forwards of steady sizes reuses its memory and faults none.
"""

from __future__ import annotations

import os

import torch

# Just under glibc's ceiling for the dynamic threshold (32 MiB, the chunk's header and alignment included).
BLOCK_BYTES = 31 << 20
_tried = False


def keep_freed_memory() -> None:
    """Raise glibc's mmap and trim thresholds for this process, once, by freeing one mapped block (the dynamic
    adjustment glibc itself makes; no setting is changed): the process then keeps up to 62 MiB of freed heap for
    its next temporaries. Nothing is touched, so nothing is faulted in; elsewhere than glibc, nothing happens."""
    global _tried
    if not _tried and _glibc():
        torch.empty(BLOCK_BYTES, dtype=torch.uint8)  # freed at once: unmapped, so the thresholds rise
    _tried = True


def _glibc() -> bool:
    try:
        return (os.confstr("CS_GNU_LIBC_VERSION") or "").startswith("glibc")
    except (ValueError, OSError, AttributeError):  # no such name here (macOS, Windows, musl)
        return False
