"""The sd_notify protocol, written here: pure encoding under a thin, never-blocking sender.

systemd hands a ``Type=notify`` service a datagram socket in ``$NOTIFY_SOCKET`` (a path, or with
a leading ``@`` a name in the abstract namespace) and, with ``WatchdogSec=``, the ping period in
``$WATCHDOG_USEC`` (for the process in ``$WATCHDOG_PID`` when set). A message is one datagram of
``KEY=value`` lines (sd_notify(3)). That is a dozen lines of socket code, so no C extension and
no library: the encode functions below are pure and tested without I/O, and ``Notifier`` only
sends bytes.

Sending must never hold up the event loop nor end the daemon: the socket is non-blocking, a
daemon not started by systemd has no ``$NOTIFY_SOCKET`` and every send is a no-op, and a failed
send is logged once and otherwise ignored (systemd then acts on the missing message itself: a
start timeout, or a watchdog restart).
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping, MutableMapping

import anyio
from msgspec import Struct

from supervisor.log import get_logger

log = get_logger(__name__)

ENV_SOCKET = "NOTIFY_SOCKET"
ENV_WATCHDOG_USEC = "WATCHDOG_USEC"
ENV_WATCHDOG_PID = "WATCHDOG_PID"
# systemd truncates STATUS= in `systemctl status` anyway; a bounded text keeps a datagram small.
MAX_STATUS_CHARS = 200

READY = b"READY=1\n"
STOPPING = b"STOPPING=1\n"
WATCHDOG = b"WATCHDOG=1\n"


# --- pure: the messages -----------------------------------------------------------------------


def encode(fields: Mapping[str, str]) -> bytes:
    """One notify datagram: ``KEY=value`` lines. A value is one line (a newline would start a
    new assignment systemd would read as its own), so line breaks become spaces."""
    lines = []
    for key, value in fields.items():
        if not key or not key.replace("_", "").isalnum() or not key.isupper():
            raise ValueError(f"not a notify key: {key!r}")
        lines.append(f"{key}={' '.join(str(value).splitlines())}\n")
    return "".join(lines).encode()


def status_text(state: str, server: str | None, reason: str | None = None) -> str:
    """What `systemctl status` shows on its ``Status:`` line: the state and the server."""
    text = state if server is None else f"{state}, server {server}"
    if reason:
        text += f" ({reason})"
    return text[:MAX_STATUS_CHARS]


def status(state: str, server: str | None, reason: str | None = None) -> bytes:
    return encode({"STATUS": status_text(state, server, reason)})


def socket_address(value: str | None) -> str | None:
    """The address to send to, from ``$NOTIFY_SOCKET``: a path, or ``\\0name`` for ``@name``.
    None when unset, empty, or a kind this sender does not speak (e.g. ``vsock:``)."""
    if not value:
        return None
    if value.startswith("@"):
        return "\0" + value[1:] if len(value) > 1 else None
    if value.startswith("/"):
        return value
    return None


def watchdog_interval(environ: Mapping[str, str], pid: int) -> float | None:
    """Seconds between two ``WATCHDOG=1``: half of ``$WATCHDOG_USEC`` (as sd_watchdog_enabled(3)
    advises), or None when there is no watchdog for this process."""
    usec = environ.get(ENV_WATCHDOG_USEC, "")
    if not usec.isdigit() or int(usec) == 0:
        return None
    owner = environ.get(ENV_WATCHDOG_PID, "")
    if owner and (not owner.isdigit() or int(owner) != pid):
        return None  # meant for another process (our parent, say)
    return int(usec) / 2 / 1_000_000


# --- the thin shell ---------------------------------------------------------------------------


class Notifier(Struct):
    """Sends notify datagrams to systemd, or nothing when systemd did not ask for them."""

    address: str | None
    watchdog_s: float | None = None
    _sock: socket.socket | None = None
    _failed: bool = False

    @classmethod
    def from_environ(
        cls, environ: MutableMapping[str, str] | None = None, pid: int | None = None
    ) -> Notifier:
        """Read the protocol's variables and take them out of the environment, so that the
        processes the daemon starts (wireguard-go, hooks) do not inherit them (sd_notify(3)'s
        ``unset_environment``)."""
        environ = os.environ if environ is None else environ
        notifier = cls(
            socket_address(environ.get(ENV_SOCKET)),
            watchdog_interval(environ, os.getpid() if pid is None else pid),
        )
        for name in (ENV_SOCKET, ENV_WATCHDOG_USEC, ENV_WATCHDOG_PID):
            environ.pop(name, None)
        return notifier

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def send(self, message: bytes) -> bool:
        """Send one datagram without blocking; False (and one log line, the first time) when it
        could not be sent. Never raises."""
        if self.address is None:
            return False
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                self._sock.setblocking(False)
            self._sock.sendto(message, self.address)
        except OSError as err:
            if not self._failed:
                log.warning("could not notify systemd", socket=self.address.lstrip("\0"), error=str(err))
                self._failed = True
            return False
        return True

    def ready(self) -> bool:
        return self.send(READY)

    def stopping(self) -> bool:
        return self.send(STOPPING)

    def status(self, state: str, server: str | None, reason: str | None = None) -> bool:
        return self.send(status(state, server, reason))

    async def keep_watchdog_fed(self) -> None:
        """``WATCHDOG=1`` every half period until cancelled. Run in the daemon's task group: a loop
        that stops turning stops the pings, and systemd restarts the daemon."""
        if self.watchdog_s is None or self.address is None:
            return
        while True:
            self.send(WATCHDOG)
            await anyio.sleep(self.watchdog_s)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
