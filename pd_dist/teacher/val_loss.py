"""The teacher's held-out loss, measured where the teacher runs and left where the students read it:
a teacher rank in the job's store, the generation job (or a write-through) beside the store it writes."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from pd_dist.cluster.topology import Topology
from pd_dist.data import PackedDataset

TEACHER_EVAL = "teacher_eval.json"


def publish_teacher_val_loss(topo: Topology, loss: Optional[float], as_rank: Optional[int] = None) -> None:
    """A teacher rank: make its held-out loss readable by its students (under the rank they send
    requests to: `as_rank`, for the last stage of a pipelined replica)."""
    topo.store.set(f"pd/teacher_val_loss/{topo.rank if as_rank is None else as_rank}", json.dumps(loss))


def read_teacher_val_loss(topo: Topology, teacher_rank: int) -> Optional[float]:
    key = f"pd/teacher_val_loss/{teacher_rank}"
    return json.loads(topo.store.get(key).decode()) if topo.store.check([key]) else None


def write_store_teacher_eval(root, data: PackedDataset, loss: Optional[float]) -> None:
    """Beside a store: the teacher's loss on the data's held-out samples."""
    (Path(root) / TEACHER_EVAL).write_text(json.dumps(
        {"data_fingerprint": data.fingerprint, "val_samples": int(data.n_val), "val_loss": loss},
        indent=1) + "\n")


def read_store_teacher_eval(root, data: PackedDataset) -> Optional[float]:
    """The figure write_store_teacher_eval left, if it was measured on this data's held-out samples."""
    try:
        info = json.loads((Path(root) / TEACHER_EVAL).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(info, dict) or info.get("data_fingerprint") != data.fingerprint \
            or info.get("val_samples") != data.n_val:
        return None
    loss = info.get("val_loss")
    return float(loss) if isinstance(loss, (int, float)) else None
