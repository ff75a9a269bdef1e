"""Which nodes the controller may place on (pure; time is passed in): the dead set of a health
snapshot (dead_nodes), and a ban list with growing backoff.

A node that failed a step is banned for `initial_s`; each further failure while it is on probation
doubles the ban, up to `max_s`. A node that then stays healthy for `forgive_s` starts again at
`initial_s`. So a flapping node is retried less and less often, and a node that rebooted once is
back within seconds.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace

__all__ = ["Ban", "BanList", "dead_nodes"]


@dataclass(frozen=True)
class Ban:
    until: float  # monotonic seconds
    backoff_s: float  # the length of this ban
    reason: str
    last_failure: float


@dataclass
class BanList:
    initial_s: float = 2.0
    max_s: float = 120.0
    forgive_s: float = 300.0
    bans: dict[str, Ban] = field(default_factory=dict)

    def ban(self, node_id: str, now: float, reason: str) -> Ban:
        prev = self.bans.get(node_id)
        if prev is not None and now - prev.last_failure < self.forgive_s:
            backoff = min(prev.backoff_s * 2, self.max_s)
        else:
            backoff = self.initial_s
        b = Ban(now + backoff, backoff, reason, now)
        self.bans[node_id] = b
        return b

    def banned(self, node_id: str, now: float) -> bool:
        b = self.bans.get(node_id)
        return b is not None and now < b.until

    def expired(self, now: float) -> list[str]:
        """Nodes whose ban is over but that have not been readmitted yet (probe them)."""
        return [n for n, b in self.bans.items() if now >= b.until and b.reason]

    def readmit(self, node_id: str) -> None:
        """The node answered again; keep its backoff history (for forgive_s) but clear the ban."""
        b = self.bans.get(node_id)
        if b is not None:
            self.bans[node_id] = replace(b, until=0.0, reason="")

    def extend(self, node_id: str, now: float) -> None:
        """A probe after the ban failed (the node is still rebooting): wait the same backoff again.
        Only a new failure after readmission lengthens the ban."""
        b = self.bans.get(node_id)
        if b is None:
            self.ban(node_id, now, "did not answer")
        else:
            self.bans[node_id] = Ban(now + b.backoff_s, b.backoff_s, b.reason or "did not answer", b.last_failure)

    def down(self, now: float) -> dict[str, str]:
        """node id -> reason, for the nodes not readmitted yet."""
        return {n: b.reason for n, b in self.bans.items() if b.reason}


def dead_nodes(nodes: list[str], ray_alive: set[str] | None, answers: Mapping[str, bool], suspect: str | None,
               deadline_passed: bool, step_timeout_s: float) -> dict[str, str]:
    """What happens when a worker dies starts here: node -> why it is taken out, from a health snapshot.

    ray_alive: the nodes Ray reports alive (None: Ray cannot say); answers: each node's health check
    (asked only of nodes Ray has not reported dead); suspect: the node whose address failed the step,
    deadline_passed: that step ran past its deadline. A slow node that still answers its health check
    is taken out only when it is the one that passed the deadline."""
    dead = {}
    for n in nodes:
        if ray_alive is not None and n not in ray_alive:
            dead[n] = "Ray reports the node dead"
        elif not answers.get(n, False):
            dead[n] = "no answer to a health check"
        elif n == suspect and deadline_passed:
            dead[n] = f"a step passed its {step_timeout_s:g}s deadline"
    return dead
