"""The leak test's pure parts: which probes, how a captured packet is read, how each reply kind
and each refusal is judged, the checks and the report. No sockets, no root."""

from __future__ import annotations

import errno
import struct
from dataclasses import replace
from ipaddress import ip_address

import pytest

from supervisor.leaktest import checks
from supervisor.leaktest.checks import Status
from supervisor.leaktest.judge import Evidence, Outcome, Reply, Verdict, judge, sort_captured
from supervisor.leaktest.packets import Packet, ProbeKey, ReplyKind, is_probe, parse, reply_to
from supervisor.leaktest.probes import (
    FALLBACK_TARGETS,
    Gateway,
    HostFacts,
    Kind,
    Probe,
    Uplink,
    parse_resolv_conf,
    plan_probes,
    resolvers_to_probe,
)
from supervisor.leaktest.report import Report, render_json, render_text
from supervisor.servers import Endpoint

ME4, ME6 = "192.0.2.2", "2001:db8:c::2"
GW4, GW6 = "192.0.2.1", "2001:db8:c::1"
SERVER4 = "198.51.100.6"
TUNNEL = "tunlock0"


# --- packets built by hand, as they would be captured -----------------------------------------


def ipv4(src: str, dst: str, proto: int, l4: bytes, ttl: int = 64) -> bytes:
    header = struct.pack(
        "!BBHHHBBH4s4s",
        0x45,
        0,
        20 + len(l4),
        1,
        0,
        ttl,
        proto,
        0,
        ip_address(src).packed,
        ip_address(dst).packed,
    )
    return header + l4


def ipv6(src: str, dst: str, proto: int, l4: bytes, hops: int = 64) -> bytes:
    return (
        struct.pack("!IHBB", 0x60000000, len(l4), proto, hops)
        + ip_address(src).packed
        + ip_address(dst).packed
        + l4
    )


def ip(src: str, dst: str, proto: int, l4: bytes) -> bytes:
    return (ipv6 if ":" in src else ipv4)(src, dst, proto, l4)


def udp(sport: int, dport: int, payload: bytes = b"x") -> bytes:
    return struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload


def tcp(sport: int, dport: int, flags: int) -> bytes:
    return struct.pack("!HHIIBBHHH", sport, dport, 1, 0, 0x50, flags, 65535, 0, 0)


def icmp(kind: int, code: int, rest: bytes = bytes(4), body: bytes = b"") -> bytes:
    return struct.pack("!BBH", kind, code, 0) + rest + body


def parsed(data: bytes) -> Packet:
    """``data`` parsed, when the test built a whole packet that must parse."""
    packet = parse(data)
    assert packet is not None
    return packet


def echo(kind: int, ident: int, seq: int) -> bytes:
    return icmp(kind, 0, struct.pack("!HH", ident, seq), b"tunlock-leaktest")


def icmp_proto(address: str) -> int:
    return 58 if ":" in address else 1


# --- which probes ----------------------------------------------------------------------------------


def lab_facts(**changes) -> HostFacts:
    facts = HostFacts(
        tunnel_interface=TUNNEL,
        uplinks=(Uplink("wan0", frozenset({4, 6})),),
        gateways=(Gateway(ip_address(GW4), "wan0"), Gateway(ip_address(GW6), "wan0")),
        resolvers=resolvers_to_probe(
            [ip_address(GW4)],
            [Gateway(ip_address(GW4), "wan0"), Gateway(ip_address(GW6), "wan0")],
            [ip_address("10.99.0.1")],
        ),
        endpoints=(Endpoint(ip_address(SERVER4), 51820),),
    )
    return replace(facts, **changes)


def test_every_kind_goes_unbound_and_bound_to_each_uplink_in_both_families():
    probes = plan_probes(lab_facts())
    assert len(probes) == 28
    assert {p.interface for p in probes} == {None, "wan0"}
    v4 = {(p.kind, str(p.target), p.port) for p in probes if p.family == 4}
    assert v4 == {
        (Kind.ICMP, SERVER4, 0),
        (Kind.UDP, SERVER4, 33434),
        (Kind.TCP, SERVER4, 443),
        (Kind.ENDPOINT, SERVER4, 51820),
        (Kind.ENDPOINT_OTHER_PORT, SERVER4, 51821),
        (Kind.DNS_UDP, GW4, 53),
        (Kind.DNS_TCP, GW4, 53),
        (Kind.DNS_UDP, "10.99.0.1", 53),
        (Kind.DNS_TCP, "10.99.0.1", 53),
    }
    # No IPv6 endpoint: ICMP, UDP and TCP go to a documentation address; DNS to the v6 gateway.
    v6 = {(p.kind, p.target) for p in probes if p.family == 6}
    assert (Kind.ICMP, FALLBACK_TARGETS[6]) in v6
    assert (Kind.DNS_UDP, ip_address(GW6)) in v6
    assert all(p.ttl == 1 for p in probes)
    assert TUNNEL not in {p.interface for p in probes}


def test_a_family_without_an_address_outside_the_tunnel_is_not_probed():
    probes = plan_probes(lab_facts(uplinks=(Uplink("wan0", frozenset({4})),)))
    assert {p.family for p in probes} == {4}
    assert plan_probes(lab_facts(uplinks=())) == ()


def test_a_link_local_gateway_is_probed_only_bound_to_its_own_link():
    gateway = Gateway(ip_address("fe80::1"), "wan0")
    facts = lab_facts(
        uplinks=(Uplink("wan0", frozenset({6})), Uplink("eth1", frozenset({6}))),
        gateways=(gateway,),
        resolvers=resolvers_to_probe([], [gateway], []),
    )
    dns = [p for p in plan_probes(facts) if p.kind is Kind.DNS_UDP]
    assert [p.interface for p in dns] == ["wan0"]


def test_resolvers_are_listed_once_with_their_first_origin_and_without_loopback_stubs():
    found = resolvers_to_probe(
        [ip_address("127.0.0.53"), ip_address(GW4)], [Gateway(ip_address(GW4), "wan0")], [ip_address(GW4)]
    )
    assert [(str(r.address), r.origin) for r in found] == [(GW4, "before tunlock")]


def test_resolv_conf_nameservers():
    text = "# comment\nsearch lan\nnameserver 192.0.2.1\nnameserver fe80::1%wan0 # router\nnameserver bad\n"
    assert parse_resolv_conf(text) == (ip_address(GW4), ip_address("fe80::1"))


# --- reading captured packets and the judgement of each reply kind ---------------------------------


def probe(kind: Kind, target: str, port: int, interface: str | None = "wan0") -> Probe:
    return Probe(kind, 6 if ":" in target else 4, interface, ip_address(target), port)


def key_of(p: Probe, local: int = 40000, seq: int = 7) -> ProbeKey:
    return ProbeKey(p.family, p.kind.transport, p.target, p.port, local, seq if p.kind is Kind.ICMP else 0)


def sent_packet(p: Probe, me: str, local: int = 40000, seq: int = 7) -> bytes:
    if p.kind.transport == "icmp":
        return ip(me, str(p.target), icmp_proto(me), echo(8 if p.family == 4 else 128, local, seq))
    if p.kind.transport == "tcp":
        return ip(me, str(p.target), 6, tcp(local, p.port, 0x02))
    return ip(me, str(p.target), 17, udp(local, p.port))


@pytest.mark.parametrize(
    ("p", "me"),
    [
        (probe(Kind.UDP, SERVER4, 33434), ME4),
        (probe(Kind.TCP, "2001:db8::1", 443), ME6),
        (probe(Kind.ICMP, SERVER4, 0), ME4),
        (probe(Kind.ICMP, "2001:db8::1", 0), ME6),
    ],
)
def test_time_exceeded_quoting_the_probe_is_a_leak(p, me):
    original = sent_packet(p, me)
    kind = 11 if p.family == 4 else 3
    router = GW4 if p.family == 4 else GW6
    reply = parse(
        ip(router, me, icmp_proto(me), icmp(kind, 0, body=original[: (20 if p.family == 4 else 40) + 8]))
    )
    assert reply is not None
    assert reply_to(reply, key_of(p)) == (ReplyKind.TIME_EXCEEDED, 0)
    assert reply_to(reply, key_of(p, local=40001)) is None  # another probe's
    verdict = judge(p, Evidence(replies=(Reply(ReplyKind.TIME_EXCEEDED, router, "wan0"),)), TUNNEL)
    assert verdict == Verdict(Outcome.LEAK, f"ICMP time exceeded from {router} on wan0")


def test_the_probe_as_sent_is_recognised_by_its_port_or_echo_identifier():
    p = probe(Kind.DNS_UDP, GW4, 53)
    packet = parse(sent_packet(p, ME4))
    assert packet is not None and is_probe(packet, key_of(p))
    assert not is_probe(packet, key_of(p, local=1))
    e = probe(Kind.ICMP, SERVER4, 0)
    echo_packet = parse(sent_packet(e, ME4))
    assert echo_packet is not None and is_probe(echo_packet, key_of(e))
    assert not is_probe(echo_packet, key_of(e, seq=8))


@pytest.mark.parametrize(
    ("p", "answer", "kind"),
    [
        (probe(Kind.ICMP, SERVER4, 0), ip(SERVER4, ME4, 1, echo(0, 40000, 7)), ReplyKind.ECHO_REPLY),
        (probe(Kind.ICMP, GW6, 0), ip(GW6, ME6, 58, echo(129, 40000, 7)), ReplyKind.ECHO_REPLY),
        (probe(Kind.TCP, SERVER4, 443), ip(SERVER4, ME4, 6, tcp(443, 40000, 0x12)), ReplyKind.SYN_ACK),
        (probe(Kind.DNS_TCP, GW6, 53), ip(GW6, ME6, 6, tcp(53, 40000, 0x14)), ReplyKind.RESET),
        (probe(Kind.UDP, SERVER4, 33434), ip(SERVER4, ME4, 17, udp(33434, 40000)), ReplyKind.UDP_ANSWER),
        (probe(Kind.DNS_UDP, GW4, 53), ip(GW4, ME4, 17, udp(53, 40000)), ReplyKind.DNS_ANSWER),
    ],
)
def test_an_answer_from_the_target_is_a_leak(p, answer, kind):
    packet = parse(answer)
    assert packet is not None
    assert reply_to(packet, key_of(p)) == (kind, 0)
    verdict = judge(p, Evidence(replies=(Reply(kind, str(packet.src), "wan0"),)), TUNNEL)
    assert verdict.outcome is Outcome.LEAK and str(kind) in verdict.how


def test_a_bare_ack_or_an_answer_from_elsewhere_says_nothing():
    p = probe(Kind.TCP, SERVER4, 443)
    assert reply_to(parsed(ip(SERVER4, ME4, 6, tcp(443, 40000, 0x10))), key_of(p)) is None
    assert reply_to(parsed(ip("203.0.113.9", ME4, 6, tcp(443, 40000, 0x12))), key_of(p)) is None


@pytest.mark.parametrize(
    ("family", "code", "name"),
    [
        (4, 3, "port unreachable"),
        (4, 13, "administratively prohibited"),
        (6, 0, "no route"),
        (6, 4, "port unreachable"),
    ],
)
def test_an_unreachable_from_another_host_means_the_probe_left(family, code, name):
    me, router = (ME4, GW4) if family == 4 else (ME6, GW6)
    p = probe(Kind.UDP, SERVER4 if family == 4 else "2001:db8::1", 33434)
    quoted = sent_packet(p, me)[: (20 if family == 4 else 40) + 8]
    packet = parsed(ip(router, me, icmp_proto(me), icmp(3 if family == 4 else 1, code, body=quoted)))
    assert reply_to(packet, key_of(p)) == (ReplyKind.UNREACHABLE, code)
    verdict = judge(p, Evidence(replies=(Reply(ReplyKind.UNREACHABLE, router, "wan0", code),)), TUNNEL)
    assert verdict == Verdict(Outcome.LEAK, f"ICMP {name} from {router} on wan0")


@pytest.mark.parametrize(
    ("code", "words"),
    [
        (errno.EPERM, "EPERM (a firewall rule in the output path dropped or rejected it)"),
        (errno.ENETUNREACH, "ENETUNREACH (no route)"),
        (errno.EHOSTUNREACH, "EHOSTUNREACH"),
        (errno.EACCES, "EACCES"),
        (errno.ECONNREFUSED, "ECONNREFUSED (a reset or port unreachable from this host"),
    ],
)
def test_a_refusal_by_the_kernel_is_blocked_and_named(code, words):
    verdict = judge(probe(Kind.UDP, SERVER4, 33434), Evidence(send_error=code), TUNNEL)
    assert verdict.outcome is Outcome.BLOCKED
    assert verdict.how.startswith("refused by the kernel: ") and words in verdict.how


def test_a_refusal_does_not_hide_what_the_capture_saw_leave():
    verdict = judge(
        probe(Kind.TCP, SERVER4, 443), Evidence(send_error=errno.EHOSTUNREACH, left_via=("wan0",)), TUNNEL
    )
    assert verdict == Verdict(Outcome.LEAK, "seen leaving wan0, no answer")


def test_into_the_tunnel_is_not_a_leak():
    p = probe(Kind.ICMP, SERVER4, 0, interface=None)
    assert judge(p, Evidence(left_via=(TUNNEL,)), TUNNEL).outcome is Outcome.TUNNEL
    via_tunnel = Reply(ReplyKind.TIME_EXCEEDED, "10.99.0.1", TUNNEL)
    assert judge(p, Evidence(left_via=(TUNNEL,), replies=(via_tunnel,)), TUNNEL).outcome is Outcome.TUNNEL
    # A socket's answer has no interface: the route tells.
    socket_answer = Reply(ReplyKind.ECHO_REPLY, SERVER4, None)
    assert judge(p, Evidence(replies=(socket_answer,), routed_via=TUNNEL), TUNNEL).outcome is Outcome.TUNNEL
    assert judge(p, Evidence(replies=(socket_answer,), routed_via="wan0"), TUNNEL).outcome is Outcome.LEAK


def test_nothing_seen_is_blocked_but_without_the_capture_unproven():
    p = probe(Kind.UDP, SERVER4, 33434)
    assert judge(p, Evidence(), TUNNEL) == Verdict(
        Outcome.BLOCKED, "not seen leaving any interface, no answer"
    )
    # Without the capture, a probe the kernel let go with no answer is what a leak looks like.
    unproven = judge(p, Evidence(captured=False), TUNNEL)
    assert unproven.outcome is Outcome.UNPROVEN and not unproven.leaked
    assert Report(((p, unproven),), (), 1.0, False).exit_code == 1
    refused = judge(p, Evidence(send_error=errno.ECONNREFUSED, captured=False), TUNNEL)
    assert "first hop would look the same" in refused.how


def test_a_probe_that_could_not_be_sent_proves_nothing():
    verdict = judge(probe(Kind.ICMP, SERVER4, 0), Evidence(setup_error="EPERM opening the socket"), TUNNEL)
    assert verdict.outcome is Outcome.UNTESTED and not verdict.leaked


def test_the_most_telling_reply_is_named():
    replies = (Reply(ReplyKind.TIME_EXCEEDED, GW4, "wan0"), Reply(ReplyKind.DNS_ANSWER, GW4, "wan0"))
    assert judge(probe(Kind.DNS_UDP, GW4, 53), Evidence(replies=replies), TUNNEL).how.startswith("DNS answer")


def test_captured_frames_are_sorted_to_their_probes():
    udp_probe, echo_probe = probe(Kind.UDP, SERVER4, 33434), probe(Kind.ICMP, SERVER4, 0)
    udp_key, echo_key = key_of(udp_probe, local=40000), key_of(echo_probe, local=40000, seq=9)
    udp_sent = sent_packet(udp_probe, ME4, local=40000)
    frames = [
        ("wan0", True, udp_sent),
        ("wan0", False, ip(GW4, ME4, 1, icmp(11, 0, body=udp_sent[:28]))),
        ("wan0", False, ip(SERVER4, ME4, 1, echo(0, 40000, 9))),
        ("wan0", False, ip(SERVER4, ME4, 17, udp(33434, 40999))),  # someone else's
        ("wan0", True, b"\x00garbage"),
    ]
    seen = sort_captured(frames, [(0, udp_key), (1, echo_key)])
    assert seen[0] == (["wan0"], [Reply(ReplyKind.TIME_EXCEEDED, GW4, "wan0", 0)])
    assert seen[1] == ([], [Reply(ReplyKind.ECHO_REPLY, SERVER4, "wan0", 0)])


# --- checks and the report -------------------------------------------------------------------------


def test_lock_check():
    assert checks.check_lock("tunlock", False, None, {}).status is Status.FAIL
    assert checks.check_lock("tunlock", True, "abc", {"abc": "every server"}).status is Status.OK
    differs = checks.check_lock("tunlock", True, "def", {"abc": "every server"})
    assert differs.status is Status.FAIL and "tunlock lock apply" in differs.how


def test_owned_twin_check():
    assert checks.check_owned("t_owned", True, True, True).status is Status.OK
    assert checks.check_owned("t_owned", True, True, True, "abc", {"abc": "server vpn1"}).status is Status.OK
    assert (
        checks.check_owned("t_owned", True, True, True, "def", {"abc": "server vpn1"}).status is Status.FAIL
    )
    assert checks.check_owned("t_owned", False, False, None).status is Status.NOTE
    assert checks.check_owned("t_owned", False, True, False).status is Status.NOTE  # no owner flag
    assert checks.check_owned("t_owned", False, True, True).status is Status.FAIL


def test_dns_check():
    tunnel = [ip_address("10.99.0.1")]
    assert checks.check_dns("r", [ip_address("10.99.0.1")], tunnel, True).status is Status.OK
    assert checks.check_dns("r", [ip_address(GW4)], tunnel, True).status is Status.FAIL
    assert checks.check_dns("r", [ip_address(GW4)], tunnel, False).status is Status.NOTE
    assert checks.check_dns("r", [], tunnel, True).status is Status.FAIL


def test_ipv6_check():
    v6 = probe(Kind.ICMP, GW6, 0)
    leak = (v6, Verdict(Outcome.LEAK, "x"))
    assert checks.check_ipv6([leak], True).status is Status.FAIL
    assert checks.check_ipv6([(v6, Verdict(Outcome.BLOCKED, "x"))], True).status is Status.OK
    assert checks.check_ipv6([], False).status is Status.OK


def test_bypass_and_tunnel_checks():
    assert checks.check_bypass([], egress_held=False).status is Status.OK
    named = checks.check_bypass([("macvlan", "mv0", "a child of eth0")], egress_held=False)
    assert named.status is Status.FAIL and "macvlan mv0" in named.how
    held = checks.check_bypass([("macvlan", "mv0", "a child of eth0")], egress_held=True)
    assert held.status is Status.NOTE and "egress chain" in held.how
    assert checks.check_tunnel(None, None, "").status is Status.NOTE
    assert checks.check_tunnel("connected", True, "answered").status is Status.OK
    assert checks.check_tunnel("connected", False, "silent").status is Status.FAIL


def test_report_exit_codes_and_lines():
    p = probe(Kind.DNS_UDP, GW4, 53)
    ok = Report(((p, Verdict(Outcome.BLOCKED, "refused")),), (), 1.2, True)
    assert ok.exit_code == 0 and "nothing got out" in render_text(ok)
    leaked = Report(((p, Verdict(Outcome.LEAK, f"DNS answer from {GW4} on wan0")),), (), 1.2, True)
    assert leaked.exit_code == 1
    text = render_text(leaked)
    assert f"dns-udp {GW4}:53  wan0  LEAK (DNS answer from {GW4} on wan0)" in text
    assert "LEAK: dns-udp got out" in text
    assert render_json(leaked)["probes"][0]["leaked"] is True
    failed = Report((), (checks.CheckResult("lock", Status.FAIL, "absent"),), 1.0, True)
    assert failed.exit_code == 1


def test_the_resolvers_before_tunlock_come_from_its_saved_copy_first(tmp_path, write_config):
    """While connected the resolver file names the tunnel's resolvers (tunlock wrote it): the
    originals are in the copy the DNS manager saved, and nothing tunlock wrote is taken."""
    from supervisor.config import load_config
    from supervisor.leaktest.run import resolvers_before
    from supervisor.net.dns import render_resolv_conf

    resolv = tmp_path / "resolv.conf"
    config = load_config(write_config(f'[tunnel]\ninterface = "tl0"\n[dns]\nresolv_conf = "{resolv}"\n'))
    tunnel = [d for s in config.servers for d in s.dns]
    resolv.write_text(render_resolv_conf(tunnel or [ip_address("10.64.0.1")]))
    state = tmp_path / "state"
    state.mkdir()
    (state / "tl0.resolv.conf.orig").write_text("nameserver 192.0.2.53\nnameserver 127.0.0.53\n")
    found, where = resolvers_before(config, state)
    assert ip_address("192.0.2.53") in found
    assert not set(found) & set(tunnel)
    assert where.startswith("resolv.conf saved by tunlock")
