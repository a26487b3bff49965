"""Reading a small text file that a person wrote (a config, a server file) without trusting it.

What the file is (a FIFO, a device, a symlink to /dev/zero), how large it is and how it is
encoded are all checked here, once, for every reader: config.py and wgquick.py.
"""

from __future__ import annotations

import os
import stat


class FileProblem(Exception):
    """A file that cannot be read as text: the line (0 when none) and what is wrong."""

    def __init__(self, line: int, message: str) -> None:
        super().__init__(message)
        self.line = line
        self.message = message


_FILE_KINDS = {
    stat.S_IFDIR: "a directory",
    stat.S_IFIFO: "a FIFO",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
    stat.S_IFSOCK: "a socket",
}


def read_text(path: str, limit: int) -> tuple[str, int]:
    """A regular file's UTF-8 text (a leading BOM dropped) and its mode, at most ``limit`` bytes.

    Opened with O_NONBLOCK so that a FIFO cannot hold the reader (a reload would block the
    daemon), and refused unless fstat on the opened file says regular: a symlink is followed,
    then judged by what it names (/dev/zero would read forever). Four system calls for a small
    file, not a Python file object (speed). Raises FileProblem.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError as err:
        raise FileProblem(0, f"cannot read: {err.strerror or err}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            kind = _FILE_KINDS.get(stat.S_IFMT(st.st_mode), "not a regular file")
            raise FileProblem(0, f"is {kind}, not a regular file: refused")
        if st.st_size > limit:
            raise FileProblem(0, f"too large: {st.st_size} bytes, the limit is {limit // 1024} KiB")
        data = os.read(fd, st.st_size + 1)
        if len(data) > st.st_size:  # it grew while being read
            chunks = [data]
            total = len(data)
            while total <= limit and (chunk := os.read(fd, 65536)):
                chunks.append(chunk)
                total += len(chunk)
            if total > limit:
                raise FileProblem(0, f"too large: over {limit // 1024} KiB")
            data = b"".join(chunks)
    except OSError as err:
        raise FileProblem(0, f"cannot read: {err.strerror or err}") from None
    finally:
        os.close(fd)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        raise FileProblem(line, f"not UTF-8 text (byte 0x{data[err.start]:02x})") from None
    # Editors on Windows start a UTF-8 file with a byte order mark.
    return text.removeprefix("\ufeff"), st.st_mode
