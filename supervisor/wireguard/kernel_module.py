"""Whether this kernel speaks WireGuard: what ``tunnel.backend = "auto"`` decides on.

The module is loaded (``/sys/module/wireguard``), or its generic netlink family answers a
lookup, which also finds a built-in WireGuard and lets the kernel load the module on demand; no
link is created to find out.

The lookup is one request and one reply on a netlink socket, written with the standard library:
``tunlock run`` asks before the daemon (and pyroute2, ~50 ms to import) is loaded
(supervisor/early_tunnel.py), and the daemon asks the same function so that both always agree.
"""

from __future__ import annotations

import errno
import os
import socket
import struct
from pathlib import Path

MODULE_DIR = Path("/sys/module/wireguard")

# linux/netlink.h, linux/genetlink.h
_NETLINK_GENERIC = 16
_GENL_ID_CTRL = 0x10
_CTRL_CMD_GETFAMILY = 3
_CTRL_ATTR_FAMILY_NAME = 2
_NLM_F_REQUEST = 0x1
_NLMSG_ERROR = 0x2
_NLMSG_HEADER = struct.Struct("=IHHII")
_TIMEOUT_S = 2.0


def kernel_has_wireguard(module_dir: Path = MODULE_DIR) -> bool:
    """Blocking (a netlink round trip, and the kernel may load a module meanwhile); OSError when
    the kernel answers something else than "there" or "no such family"."""
    if module_dir.exists():
        return True
    return generic_family_exists("wireguard")


def generic_family_exists(name: str) -> bool:
    """Whether the generic netlink family ``name`` is there (the kernel may load its module)."""
    family = name.encode() + b"\0"
    attribute = struct.pack("=HH", 4 + len(family), _CTRL_ATTR_FAMILY_NAME) + family
    attribute += b"\0" * (-len(attribute) % 4)
    body = struct.pack("=BBH", _CTRL_CMD_GETFAMILY, 1, 0) + attribute
    request = _NLMSG_HEADER.pack(_NLMSG_HEADER.size + len(body), _GENL_ID_CTRL, _NLM_F_REQUEST, 1, 0) + body
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, _NETLINK_GENERIC) as sock:
        sock.settimeout(_TIMEOUT_S)
        sock.bind((0, 0))
        sock.sendto(request, (0, 0))
        reply = sock.recv(65536)
    if len(reply) < _NLMSG_HEADER.size:
        raise OSError(errno.EPROTO, f"a short reply to the lookup of the {name} family")
    _, kind, _, _, _ = _NLMSG_HEADER.unpack_from(reply)
    if kind == _NLMSG_ERROR:
        (code,) = struct.unpack_from("=i", reply, _NLMSG_HEADER.size)
        if code == -errno.ENOENT:
            return False
        raise OSError(-code, f"the lookup of the {name} family failed: {os.strerror(-code)}")
    return kind == _GENL_ID_CTRL
