"""How long `tunlock check` takes over 10,000 server files (goal: <= 1 s).

Run: .venv/bin/python bench/bench_check.py [COUNT]
Prints the time of check.read_checked (every file read, parsed and validated, as `check` does)
and of the whole `tunlock check` command (process start included): best and median of five
runs, since this machine's two shared cores make single runs vary by a third.

Where the time went: the profiles (cProfile over 10,000 provider-like files, 2 vCPU, 2026-11)
behind the choices marked "(speed)" in supervisor/wgquick.py, supervisor/addresses.py,
supervisor/files.py and supervisor/check.py:

- reading one file costs about 0.1 ms of CPU, nearly all of it Python: so `check` spreads a
  directory of PARALLEL_FROM_FILES files or more over the cores (this process reads one share,
  forked workers the others) and workers send back ServerDigests, since pickling Servers
  (ipaddress and dataclass values) cost more than the pool saved;
- parsing addresses was most of the cost of a file (ipaddress parses strings slowly):
  inet_pton and per-value caches (a provider's files share client address, DNS, AllowedIPs);
  ipaddress.ip_interface formats an error message for every IPv6 address, which cost more than
  the parse, and an interface built from an address object reparses its str();
- wgconfig's whole-file parser keeps no line numbers: the second pass needed to point at a
  problem was a third of what checking a file cost, so the file is scanned once, with a
  tokeniser of tunlock's own (supervisor/wgquick.py says why);
- building interface objects `check` throws away was an eighth of the cost of a file: its
  reader only validates Address entries and keeps their families;
- formatting IPv6 endpoints to count distinct ones was a fifth of a check: a digest keeps
  (version, address as int, port);
- a Path per file was a tenth of a check (paths stay str); Python file objects cost half again
  as much as os.open/fstat/read/close, another tenth;
- the garbage collector's passes over the growing result list were a sixth of the time (reading
  makes no cycles: it rests while reading), and its passes at exit 0.1 s, a tenth of the
  check (gc.freeze before exiting).
"""

from __future__ import annotations

import base64
import compileall
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from supervisor.check import read_checked

SERVER = """[Interface]
PrivateKey = {private}
Address = 10.{a}.{b}.2/32, fd00:{a}:{b}::2/128
DNS = 10.{a}.{b}.1

[Peer]
PublicKey = {public}
Endpoint = {endpoint}:51820
AllowedIPs = 0.0.0.0/0, ::/0
PersistentKeepalive = 25
"""


RUNS = 5


def key() -> str:
    return base64.b64encode(os.urandom(32)).decode()


def write_servers(root: Path, count: int) -> Path:
    servers = root / "servers"
    servers.mkdir()
    for i in range(count):
        a, b = divmod(i, 250)
        endpoint = f"198.51.100.{i % 250 + 1}" if i % 2 else f"[2001:db8:{a:x}::{b + 1:x}]"
        path = servers / f"server-{i:05d}.conf"
        path.write_text(SERVER.format(private=key(), public=key(), a=a % 250, b=b, endpoint=endpoint))
        path.chmod(0o600)
    config = root / "tunlock.toml"
    config.write_text('[tunnel]\nservers = ["servers/*.conf"]\n')
    return config


def reference_loop() -> float:
    """Seconds for a fixed pure-Python loop: how fast this shared machine is right now."""
    start = time.perf_counter()
    total = 0
    for i in range(5_000_000):
        total += i
    return time.perf_counter() - start


def main() -> None:
    count = int(sys.argv[1]) if len(sys.argv) > 1 else 10_000
    # As scripts/bootstrap does: with PYTHONDONTWRITEBYTECODE, modules edited since would be
    # compiled again at every start, and that is not what an installed tunlock pays.
    compileall.compile_dir(Path(__file__).resolve().parents[1] / "supervisor", quiet=1)
    before = reference_loop()
    with tempfile.TemporaryDirectory() as tmp:
        config = write_servers(Path(tmp), count)
        in_process = []
        for _ in range(RUNS):
            start = time.perf_counter()
            loaded = read_checked(config, {})
            in_process.append(time.perf_counter() - start)
        assert len(loaded.servers) == count
        whole = []
        for _ in range(RUNS):
            start = time.perf_counter()
            subprocess.run(
                [sys.executable, "-m", "supervisor.cli", "check", "--config", str(config)],
                check=True,
                capture_output=True,
            )
            whole.append(time.perf_counter() - start)
    print(
        f"reference loop: {before:.2f} s before, {reference_loop():.2f} s after "
        "(seconds of a fixed pure-Python loop: the machine's speed while measuring)"
    )
    print(
        f"check: {count} server files: read_checked best {min(in_process):.3f} s "
        f"({min(in_process) / count * 1e6:.0f} us/file), median {statistics.median(in_process):.3f} s; "
        f"whole `tunlock check` best {min(whole):.3f} s, median {statistics.median(whole):.3f} s"
    )


if __name__ == "__main__":
    main()
