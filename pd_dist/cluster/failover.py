"""Failover bookkeeping of one job (topology.teacher_failover), all of it on the job's TCPStore: which
teacher replicas are lost, which students a replica is asked to adopt, which student clients are done
(and finished the run), and whose heartbeat stopped. Clients, servers and the end-of-run barrier read and
write these keys only through this module."""
from __future__ import annotations

from typing import Optional

# `topo` arguments are a pd_dist.cluster.topology.Topology, which imports this module.
# The teacher replicas (by index) found lost mid-run, in the order they were found (topology.teacher_failover).
LOST_TEACHERS = "pd/failover/lost"


class StoreLog:
    """An append-only list of ints on the job's store: any rank pushes, each reader sees every entry once
    (a counter, then one key per entry). A reader polls with one store round trip."""

    def __init__(self, store, key: str):
        self.store, self.key, self.seen = store, key, 0

    def push(self, value: int) -> None:
        i = self.store.add(f"{self.key}/n", 1)
        self.store.set(f"{self.key}/{i}", str(value))

    def count(self) -> int:
        return self.store.add(f"{self.key}/n", 0)

    def new(self) -> list[int]:
        """The entries pushed since the last call (get waits for an entry whose pusher has counted it
        but not yet written it)."""
        n = self.count()
        out = [int(self.store.get(f"{self.key}/{i}")) for i in range(self.seen + 1, n + 1)]
        self.seen = max(self.seen, n)
        return out


def mark_teacher_lost(store, replica: int) -> bool:
    """Record teacher replica ``replica`` as lost (once, whoever finds it first); True for the first."""
    first = store.add(f"pd/failover/lost-replica/{replica}", 1) == 1
    if first:
        StoreLog(store, LOST_TEACHERS).push(replica)
    return first


def teacher_is_lost(store, replica: int) -> bool:
    return store.check([f"pd/failover/lost-replica/{replica}"])


class HeartbeatWatch:
    """Notices peers whose heartbeat stopped advancing for ``timeout_s``: they died, hang, or the network
    to them is cut. A teacher waits for its students' next request with no deadline (they pause for
    evaluation and checkpoints), so without this a cut link would leave it waiting forever."""

    def __init__(self, topo, ranks: list[int], timeout_s: float, every_s: float = 1.0):
        import time

        self.topo, self.ranks, self.timeout_s, self.every_s = topo, ranks, timeout_s, every_s
        now = time.monotonic()
        self._seen = {r: (-1, now) for r in ranks}
        self._last_check = 0.0

    def stalled(self) -> list[tuple[int, float]]:
        """(rank, seconds since its heartbeat last advanced) for each watched rank past the timeout;
        reads the store at most every ``every_s``. The store's host (rank 0) unreachable: rank 0."""
        import time

        now = time.monotonic()
        if self.topo.store is None or now - self._last_check < self.every_s:
            return []
        self._last_check = now
        out = []
        for r in self.ranks:
            try:
                n = self.topo.store.add(f"pd/beat/{r}", 0)
            except Exception:
                return [(0, float("nan"))]
            last, t = self._seen[r]
            if n != last:
                self._seen[r] = (n, now)
            elif now - t > self.timeout_s:
                out.append((r, now - t))
        return out

    def forget(self, rank: int) -> None:
        """Stop watching a peer that left on purpose."""
        if rank in self.ranks:
            self.ranks.remove(rank)

    def add(self, rank: int) -> None:
        """Start watching one more peer (a student adopted from a lost teacher replica)."""
        import time

        if rank not in self.ranks:
            self.ranks.append(rank)
            self._seen[rank] = (-1, time.monotonic())


# topology.teacher_failover: the store keys of the students each teacher rank is asked to adopt
# (ADOPT/<teacher rank>), of the student clients done with their teacher, and how often a serving
# replica looks at them.
ADOPT = "pd/failover/adopt"
STUDENTS_DONE = "pd/failover/done"
STUDENTS_FINISHED = "pd/failover/finished"  # a count: clients that trained to the end of the run


def job_finished(topo) -> bool:
    """With topology.teacher_failover: every student client of the job said it trained to the end (read
    once all are done; a replica's own stats cannot know, its students may have gone elsewhere)."""
    return topo.store.add(STUDENTS_FINISHED, 0) >= topo.layout.dp


def first_live_replica(topo) -> Optional[int]:
    """The lowest teacher replica not recorded lost (the one that completes shared work), or None."""
    return next((r for r in range(topo.layout.n_replicas) if not teacher_is_lost(topo.store, r)), None)
ADOPT_POLL_S = 0.5
