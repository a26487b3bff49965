"""The lab: WireGuard servers, an ISP with a leak observer, and faults, in network namespaces."""
