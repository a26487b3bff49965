"""The lock's sets of WireGuard endpoints: their names and how an endpoint is written in them.

Apart from the renderer (supervisor/lock/render.py) so that ``tunlock run``'s early bring-up can
ask the lock in place whether it lets a server's WireGuard through (supervisor/early_tunnel.py)
with nothing of the lock's code but this loaded.
"""

from __future__ import annotations

from supervisor.servers import Endpoint

ENDPOINT_SETS = {4: "endpoints4", 6: "endpoints6"}


def endpoint_element(endpoint: Endpoint) -> str:
    """``endpoint`` as an element of its family's set (address . port)."""
    return f"{endpoint.host} . {endpoint.port}"


def endpoint_query(table: str, endpoint: Endpoint) -> str:
    """The nft command that finds ``endpoint`` in ``table``'s set, and fails when it is not there."""
    return f"get element inet {table} {ENDPOINT_SETS[endpoint.family]} {{ {endpoint_element(endpoint)} }}"
