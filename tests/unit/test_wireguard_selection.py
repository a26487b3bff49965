"""Which backend ``tunnel.backend`` means on a given host (the pure choice)."""

from __future__ import annotations

from pathlib import Path

import pytest

from supervisor.wireguard import selection
from supervisor.wireguard.kernel_module import generic_family_exists, kernel_has_wireguard
from supervisor.wireguard.selection import choose_backend, kernel_available, open_backend
from supervisor.wireguard.userspace import UserspaceBackend


@pytest.mark.parametrize(
    ("wanted", "kernel", "uapi_served", "link_present", "chosen"),
    [
        ("auto", True, False, False, "kernel"),  # the kernel is preferred when it has WireGuard
        ("auto", False, False, False, "userspace"),
        ("auto", True, True, True, "userspace"),  # a running wireguard-go is adopted, not replaced
        ("auto", True, False, True, "kernel"),  # an existing kernel link is adopted
        ("kernel", False, True, False, "kernel"),  # an explicit choice is kept (and fails loudly later)
        ("userspace", True, False, False, "userspace"),
    ],
)
def test_choice(wanted: str, kernel: bool, uapi_served: bool, link_present: bool, chosen: str) -> None:
    assert (
        choose_backend(wanted, kernel=kernel, uapi_served=uapi_served, link_present=link_present)  # type: ignore[arg-type]
        == chosen
    )


def test_a_loaded_module_means_available(tmp_path: Path) -> None:
    assert kernel_has_wireguard(module_dir=tmp_path)


def test_the_family_lookup_tells_a_family_that_is_there_from_one_that_is_not() -> None:
    # Real generic netlink, no root needed: the controller's own family is always there.
    assert generic_family_exists("nlctrl")
    assert not generic_family_exists("tl-nonesuch")


@pytest.mark.anyio
async def test_the_daemon_asks_the_same_lookup(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(selection, "kernel_has_wireguard", lambda: True)
    assert await kernel_available()


@pytest.mark.anyio
async def test_open_backend_opens_the_named_kind(tmp_path: Path) -> None:
    async with open_backend("userspace", "tl0", uapi_dir=tmp_path) as backend:
        assert isinstance(backend, UserspaceBackend) and backend.kind == "userspace"
    with pytest.raises(ValueError, match="unknown backend"):
        async with open_backend("bsd", "tl0"):
            pass
