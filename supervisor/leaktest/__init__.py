"""``tunlock leaktest``: the user's own host shows that nothing leaves outside the tunnel.

Shaped like the other adapters: what to send and how to judge what comes back are pure
(``probes``, ``packets``, ``judge``, ``checks``, ``report``: data in, data out, unit-tested without
I/O); ``run`` is the thin async shell that finds the host's interfaces and resolvers, sends the
probes in parallel, captures what passes the interfaces and asks the lock and the daemon.
docs/leaktest.md says what a run proves and what it cannot.
"""
