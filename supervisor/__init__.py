"""tunlock: a WireGuard supervisor with a kill switch that never opens."""

from supervisor import lean_pyroute2

__version__ = "0.1.0"

lean_pyroute2.install()
