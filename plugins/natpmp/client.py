"""The thin socket side of NAT-PMP: one connected UDP socket per exchange, bound to the tunnel.

Bound to the tunnel's own address so that the request leaves through the tunnel (a provider
answers only its own clients) and connected to the gateway so that the kernel drops a reply from
anyone else. Each try waits 250 ms, doubling (RFC 6886 section 3.1); a garbled reply is ignored
like a lost one, a refusal ends the exchange at once.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from ipaddress import IPv4Address
from typing import TypeVar

import anyio

from plugins.natpmp import codec
from supervisor.log import get_logger

log = get_logger(__name__)

T = TypeVar("T")


class NatPmpTimeout(TimeoutError):
    """No usable reply after every try."""


class NatPmpClient:
    def __init__(
        self,
        gateway: IPv4Address,
        source: IPv4Address | None,
        timeouts: Sequence[float] = tuple(codec.retry_timeouts()),
        port: int = codec.PORT,
    ) -> None:
        self.gateway = gateway
        self.source = source
        self.timeouts = tuple(timeouts)
        self.port = port

    async def _exchange(self, request: bytes, decode: Callable[[bytes], T]) -> T:
        async with await anyio.create_connected_udp_socket(
            str(self.gateway),
            self.port,
            local_host=str(self.source) if self.source else None,
        ) as sock:
            for attempt, timeout in enumerate(self.timeouts, start=1):
                if attempt > 1:
                    log.debug(
                        "NAT-PMP try unanswered; sending again", gateway=str(self.gateway), attempt=attempt
                    )
                await sock.send(request)
                with anyio.move_on_after(timeout):
                    while True:
                        try:
                            data = await sock.receive()
                        except OSError:
                            # ICMP unreachable surfaces here: nothing listens yet; wait the try out.
                            await anyio.sleep(math.inf)
                        try:
                            return decode(data)
                        except codec.NatPmpRefused:
                            raise
                        except codec.NatPmpError:
                            continue  # not an answer to this request
        raise NatPmpTimeout(f"no NAT-PMP answer from {self.gateway} after {len(self.timeouts)} tries")

    async def external_address(self) -> codec.ExternalAddress:
        return await self._exchange(codec.encode_external_address(), codec.decode_external_address)

    async def map(
        self, protocol: str, internal_port: int, external_port: int, lifetime_s: int
    ) -> codec.Mapping:
        request = codec.encode_map(protocol, internal_port, external_port, lifetime_s)
        return await self._exchange(request, lambda data: codec.decode_map(data, protocol, internal_port))

    async def unmap(self, protocol: str, internal_port: int) -> codec.Mapping:
        return await self.map(protocol, internal_port, 0, 0)
