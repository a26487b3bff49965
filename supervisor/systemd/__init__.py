"""systemd integration: the sd_notify protocol, the service units, ``tunlock systemd install``."""
