"""The passive lock: one nftables table that stays in place whether or not the daemon runs."""
