"""A leak test's result, as text for a person and JSON for a program (pure)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from supervisor.leaktest.checks import CheckResult, Status
from supervisor.leaktest.judge import Outcome, Verdict
from supervisor.leaktest.probes import PROBE_TTL, Probe


@dataclass(frozen=True)
class Report:
    results: tuple[tuple[Probe, Verdict], ...]
    checks: tuple[CheckResult, ...]
    seconds: float
    captured: bool  # the packet capture ran
    notes: tuple[str, ...] = field(default=())

    @property
    def leaks(self) -> list[tuple[Probe, Verdict]]:
        return [(p, v) for p, v in self.results if v.leaked]

    @property
    def failed_checks(self) -> list[CheckResult]:
        return [c for c in self.checks if c.status is Status.FAIL]

    @property
    def exit_code(self) -> int:
        """0 when nothing got out and every check holds, 1 otherwise."""
        return 1 if self.leaks or self.count(Outcome.UNPROVEN) or self.failed_checks else 0

    def count(self, outcome: Outcome) -> int:
        return sum(1 for _, v in self.results if v.outcome is outcome)


def _verdict_text(verdict: Verdict) -> str:
    word = "blocked" if verdict.outcome is Outcome.TUNNEL else str(verdict.outcome)
    return f"{word} ({verdict.how})"


def summary(report: Report) -> str:
    n = len(report.results)
    untested = report.count(Outcome.UNTESTED)
    parts = [
        f"{report.count(Outcome.BLOCKED)} blocked",
        f"{report.count(Outcome.TUNNEL)} into the tunnel",
        f"{len(report.leaks)} LEAKED",
    ]
    if report.count(Outcome.UNPROVEN):
        parts.append(f"{report.count(Outcome.UNPROVEN)} unproven (LEAK?)")
    if untested:
        parts.append(f"{untested} not sent")
    checks = f"{len(report.failed_checks)} of {len(report.checks)} checks failed"
    if report.exit_code == 0:
        head = "nothing got out"
    elif report.leaks:
        kinds = sorted({str(p.kind) for p, _ in report.leaks})
        head = f"LEAK: {', '.join(kinds)} got out"
    elif report.count(Outcome.UNPROVEN):
        head = (
            "LEAK?: probes went unrefused and unanswered, and without CAP_NET_RAW there is no "
            "capture to tell whether they left (run it with CAP_NET_RAW)"
        )
    else:
        head = "a check failed"
    return f"{head}: {n} probes ({', '.join(parts)}); {checks}; {report.seconds:.1f} s"


def render_text(report: Report) -> str:
    lines = [f"tunlock leaktest: {len(report.results)} probes, hop limit {PROBE_TTL}"]
    width = max((len(p.label) for p, _ in report.results), default=0)
    via = max((len(p.via) for p, _ in report.results), default=0)
    for probe, verdict in report.results:
        lines.append(f"  {probe.label:<{width}}  {probe.via:<{via}}  {_verdict_text(verdict)}")
    lines.append("checks:")
    for check in report.checks:
        lines.append(f"  {check.name:<10}  {check.status} ({check.how})")
    lines.extend(f"note: {n}" for n in report.notes)
    lines.append(summary(report))
    return "\n".join(lines) + "\n"


def render_json(report: Report) -> dict[str, Any]:
    return {
        "exit": report.exit_code,
        "seconds": round(report.seconds, 3),
        "captured": report.captured,
        "hop_limit": PROBE_TTL,
        "probes": [
            {
                "kind": str(p.kind),
                "family": p.family,
                "interface": p.interface,
                "target": str(p.target),
                "port": p.port,
                "about": p.about,
                "outcome": str(v.outcome),
                "leaked": v.leaked,
                "how": v.how,
            }
            for p, v in report.results
        ],
        "checks": [{"name": c.name, "status": str(c.status), "how": c.how} for c in report.checks],
        "leaks": len(report.leaks),
        "unproven": report.count(Outcome.UNPROVEN),
        "notes": list(report.notes),
        "summary": summary(report),
    }
