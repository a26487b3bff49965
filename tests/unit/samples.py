"""Sample server text for the pure tests."""

from __future__ import annotations

import base64
import os


def make_key() -> str:
    return base64.b64encode(os.urandom(32)).decode()


PRIVATE_KEY = make_key()
PUBLIC_KEY = make_key()
PRESHARED_KEY = make_key()

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
