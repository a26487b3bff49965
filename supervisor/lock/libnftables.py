"""libnftables, the C library behind ``nft``, called through ctypes: one context, its errors.

Apart from the rest of the lock's code so that ``tunlock run`` can read the ruleset before the
daemon is imported (supervisor/early_tunnel.py asks whether the boot lock is in place) with
nothing but ctypes loaded.
"""

from __future__ import annotations

import ctypes

from supervisor.errors import TunlockError

LIBRARY = "libnftables.so.1"
_NFT_CTX_DEFAULT = 0


class LockError(TunlockError):
    """nft refused a change; the previous table (if any) is still in force."""


class OwnerUnavailable(LockError):
    """The kernel, nft or libnftables here cannot hold an owned table."""


class Libnftables:
    """One libnftables context (the C API of ``man 3 libnftables``); not thread-safe."""

    def __init__(self, library: str = LIBRARY) -> None:
        try:
            lib = ctypes.CDLL(library)
        except OSError as err:
            raise OwnerUnavailable(f"{library} cannot be loaded ({err})") from None
        lib.nft_ctx_new.argtypes = [ctypes.c_uint32]
        lib.nft_ctx_new.restype = ctypes.c_void_p
        lib.nft_ctx_free.argtypes = [ctypes.c_void_p]
        lib.nft_ctx_free.restype = None
        for name in ("nft_ctx_buffer_output", "nft_ctx_buffer_error"):
            getattr(lib, name).argtypes = [ctypes.c_void_p]
            getattr(lib, name).restype = ctypes.c_int
        for name in ("nft_ctx_get_output_buffer", "nft_ctx_get_error_buffer"):
            getattr(lib, name).argtypes = [ctypes.c_void_p]
            getattr(lib, name).restype = ctypes.c_char_p
        lib.nft_run_cmd_from_buffer.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
        lib.nft_run_cmd_from_buffer.restype = ctypes.c_int
        self._lib = lib
        self._ctx = lib.nft_ctx_new(_NFT_CTX_DEFAULT)
        if not self._ctx:
            raise OwnerUnavailable("nft_ctx_new failed")
        if lib.nft_ctx_buffer_output(self._ctx) or lib.nft_ctx_buffer_error(self._ctx):
            lib.nft_ctx_free(self._ctx)
            raise OwnerUnavailable("libnftables could not buffer its output")

    def run(self, script: str) -> str:
        """Run ``script`` (one transaction, as ``nft -f``); its output, or LockError with nft's."""
        if not self._ctx:
            raise LockError("the libnftables context is closed")
        rc = self._lib.nft_run_cmd_from_buffer(self._ctx, script.encode())
        # Reading a buffer also empties it for the next command.
        output = (self._lib.nft_ctx_get_output_buffer(self._ctx) or b"").decode(errors="replace")
        error = (self._lib.nft_ctx_get_error_buffer(self._ctx) or b"").decode(errors="replace")
        if rc != 0:
            raise LockError(f"nft: {condensed(error) or f'error {rc}'}")
        return output

    def free(self) -> None:
        """Close the context's netlink socket: every table it owns is gone after this."""
        if self._ctx:
            self._lib.nft_ctx_free(self._ctx)
            self._ctx = None


def condensed(error: str) -> str:
    """libnftables' error text with each distinct error once, and how often it came.

    It reports an error per netlink message the kernel refused, each as the ``Error:`` line, the
    command and carets under it. A kernel that refuses a whole transaction the same way (the table
    belongs to another process: EPERM for every message) gives ~100 copies, the carets pointing
    anywhere in a command that stands for the batch: a log line no one reads to its end.
    """
    blocks: list[list[str]] = []
    for line in error.strip().splitlines():
        if line.startswith("Error:") or not blocks:
            blocks.append([line])
        else:
            blocks[-1].append(line)
    counts: dict[str, int] = {}
    first: dict[str, list[str]] = {}
    for block in blocks:
        counts[block[0]] = counts.get(block[0], 0) + 1
        first.setdefault(block[0], block)
    out: list[str] = []
    for head, block in first.items():
        times = f" ({counts[head]} times)" if counts[head] > 1 else ""
        out += [head + times, *block[1:]]
    return "\n".join(out)
