"""Sample server text for the pure tests."""

from __future__ import annotations

import base64
import hashlib


def make_key(seed: str) -> str:
    """A well-formed key, the same in every process: parametrized test ids hold these keys, and
    the suite's workers (pytest-xdist) must collect the same ids."""
    return base64.b64encode(hashlib.sha256(seed.encode()).digest()).decode()


PRIVATE_KEY = make_key("tunlock test private key")
PUBLIC_KEY = make_key("tunlock test public key")
PRESHARED_KEY = make_key("tunlock test preshared key")

VALID_SERVER = f"""[Interface]
PrivateKey = {PRIVATE_KEY}
Address = 10.64.1.2/32, fd00:64:1::2/128
DNS = 10.64.1.1

[Peer]
PublicKey = {PUBLIC_KEY}
PresharedKey = {PRESHARED_KEY}
Endpoint = 198.51.100.11:51820
AllowedIPs = 0.0.0.0/0, ::/0
PersistentKeepalive = 25
"""
