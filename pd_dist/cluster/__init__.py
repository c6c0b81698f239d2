"""Ranks and the wire: the rank layout (teacher/student groups), the process groups of one job
(`Topology`), the teacher<->student bridge protocol, and the failover bookkeeping of a job's store."""
