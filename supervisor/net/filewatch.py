"""Waking up when a file changes: inotify on the file and on its directory.

A DHCP client rewrites ``/etc/resolv.conf`` in place (a bind-mounted file in a container) or
writes a new file and renames it over the old one (``dhclient-script``, NetworkManager); the
first is seen on the file itself, the second on its directory (the old inode's watch goes
quiet). Both watches feed one descriptor, read when the event loop says it is readable: no
thread and no polling.

Hand-written on ctypes: the standard library has no inotify, and the job is three libc calls
and a read whose content is not even needed (any event means "look again"); a dependency for
that would bring more than it saves.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import struct
from collections.abc import AsyncIterator
from pathlib import Path

import anyio

# linux/inotify.h
IN_MODIFY = 0x002
IN_ATTRIB = 0x004
IN_CLOSE_WRITE = 0x008
IN_MOVED_TO = 0x080
IN_CREATE = 0x100
IN_DELETE_SELF = 0x400
IN_MOVE_SELF = 0x800
IN_NONBLOCK = os.O_NONBLOCK
IN_CLOEXEC = os.O_CLOEXEC
_FILE_EVENTS = IN_MODIFY | IN_CLOSE_WRITE | IN_ATTRIB | IN_DELETE_SELF | IN_MOVE_SELF
_DIR_EVENTS = IN_MOVED_TO | IN_CREATE | IN_CLOSE_WRITE
_EVENT = struct.Struct("iIII")  # struct inotify_event: wd, mask, cookie, len; then len bytes of name


class _Inotify:
    def __init__(self) -> None:
        self._libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        fd = self._libc.inotify_init1(IN_NONBLOCK | IN_CLOEXEC)
        if fd < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"inotify_init1: {os.strerror(err)}")
        self.fd: int = fd

    def watch(self, path: Path, mask: int) -> int:
        """Watch ``path``: its watch descriptor, or -1 when it cannot be (gone, not permitted)."""
        return int(self._libc.inotify_add_watch(self.fd, os.fsencode(path), mask))

    def drain(self, wanted: int, name: bytes) -> bool:
        """Read every queued event; whether any was about the watch ``wanted`` or the entry ``name``."""
        seen = False
        while True:
            try:
                data = os.read(self.fd, 64 * 1024)
            except BlockingIOError:
                return seen
            if not data:
                return seen
            offset = 0
            while offset + _EVENT.size <= len(data):
                wd, _mask, _cookie, length = _EVENT.unpack_from(data, offset)
                entry = data[offset + _EVENT.size : offset + _EVENT.size + length].rstrip(b"\0")
                seen = seen or wd == wanted or entry == name
                offset += _EVENT.size + length

    def close(self) -> None:
        os.close(self.fd)


@contextlib.asynccontextmanager
async def file_changes(path: Path) -> AsyncIterator[AsyncIterator[None]]:
    """An iterator that yields once after each burst of changes to ``path`` (written, replaced,
    created, its attributes changed). The watch on the file itself is renewed after each burst,
    since a replaced file is a new inode."""
    inotify = _Inotify()

    name = os.fsencode(path.name)

    async def changes() -> AsyncIterator[None]:
        inotify.watch(path.parent, _DIR_EVENTS)
        file_wd = inotify.watch(path, _FILE_EVENTS)
        while True:
            await anyio.wait_readable(inotify.fd)
            if inotify.drain(file_wd, name):
                # A replaced file is a new inode (a new watch); the same one keeps its descriptor.
                file_wd = inotify.watch(path, _FILE_EVENTS)
                yield

    try:
        yield changes()
    finally:
        inotify.close()
