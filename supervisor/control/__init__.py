"""The control socket: the daemon's status and commands for the CLI and containers."""
