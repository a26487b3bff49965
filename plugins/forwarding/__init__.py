"""Port forwarding: one driver (``driver.PortForwarding``) for every provider of forwarded ports.

A provider implements ``provider.PortForwarder`` (obtain a lease for a connection, renew it,
release it): NAT-PMP (``plugins.natpmp``) and a static port from the configuration
(``plugins.forwarding.static``) are the two here. The driver owns the rest, the same for each:
when to ask, retries, expiry, which port the lock may accept (``trust``), the lock request and
the status.
"""
