"""tunlock: a WireGuard supervisor with a kill switch that never opens."""

__version__ = "0.1.0"
