"""The lockout guard in the commands that lock: `lock apply`, `run` and `systemd install` refuse
from an SSH session the lock would cut, naming lock.admin_tcp, exit 5; --force goes on.

The addresses, the on-link subnets and the lock's installation are stand-ins here (reading them
is I/O of this machine, and installing a lock needs a lab namespace); the lab test
(tests/lab/test_admin_confirm.py) runs the real command over a real SSH session.
"""

from __future__ import annotations

from ipaddress import ip_address
from pathlib import Path

import pytest
from click.testing import CliRunner

from supervisor.cli import main
from supervisor.lock import lockout, nft
from supervisor.lock.links import AppliedLinks

SESSION = {"SSH_CONNECTION": "203.0.113.10 50000 192.0.2.2 22"}


@pytest.fixture
def installs(monkeypatch: pytest.MonkeyPatch) -> list[object]:
    applied: list[object] = []

    def apply(policy: object) -> AppliedLinks:
        applied.append(policy)
        return AppliedLinks()

    monkeypatch.setattr(lockout, "read_addresses", lambda: {ip_address("192.0.2.2"): "eth0"})
    monkeypatch.setattr(lockout, "read_onlink", lambda exclude=(): ())
    monkeypatch.setattr(nft, "apply", apply)
    return applied


def test_lock_apply_refuses_from_a_session_it_would_cut(write_config, installs) -> None:
    path = write_config("")
    done = CliRunner().invoke(main, ["lock", "apply", "--config", str(path)], env=SESSION)
    assert done.exit_code == 5
    assert "lock apply refused" in done.output and "lock.admin_tcp" in done.output
    assert installs == [], "nothing was applied"


def test_lock_apply_goes_on_with_admin_tcp_or_force(write_config, installs) -> None:
    allowed = write_config("[lock]\nadmin_tcp = [22]\n")
    done = CliRunner().invoke(main, ["lock", "apply", "--config", str(allowed)], env=SESSION)
    assert done.exit_code == 0, done.output
    forced = write_config("")
    done = CliRunner().invoke(main, ["lock", "apply", "--force", "--config", str(forced)], env=SESSION)
    assert done.exit_code == 0 and "going on (--force)" in done.output
    assert len(installs) == 2


def test_run_and_systemd_install_refuse_too(write_config, installs, tmp_path: Path) -> None:
    path = write_config("")
    run = CliRunner().invoke(main, ["run", "--config", str(path)], env=SESSION)
    assert run.exit_code == 5 and "run refused" in run.output and "lock.admin_tcp" in run.output
    install = CliRunner().invoke(
        main,
        ["systemd", "install", "--config", str(path), "--lock-file", str(tmp_path / "lock.nft")],
        env=SESSION,
    )
    assert install.exit_code == 5 and "systemd install refused" in install.output
    assert not (tmp_path / "lock.nft").exists()


def test_check_names_the_administrators_way_in(write_config) -> None:
    path = write_config('[lock]\nadmin_tcp = [22]\nadmin_sources = ["203.0.113.0/24"]\n')
    done = CliRunner().invoke(main, ["check", "--config", str(path)])
    assert done.exit_code == 0, done.output
    assert "administrator's way in: tcp 22 from 203.0.113.0/24" in done.output
    plain = CliRunner().invoke(main, ["check", "--config", str(write_config(""))])
    assert "administrator" not in plain.output
