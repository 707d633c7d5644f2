"""glibc's C library, for the two calls zoo makes to give memory back to the system (Linux; elsewhere
nothing): malloc_trim, after freeing temporaries glibc's malloc would otherwise keep (a load, a layer's
quantization, every TRIM_EVERY CPU GEMMs: zoo/kernels/__init__.py), and madvise, after copying a tensor out
of an mmap'd file (zoo/formats/files.py)."""
import ctypes
import sys

LIBC = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None


def release_freed_memory() -> None:
    """Hand memory that glibc's malloc keeps after frees back to the system (malloc_trim(0))."""
    if LIBC is not None and hasattr(LIBC, "malloc_trim"):
        LIBC.malloc_trim(0)
