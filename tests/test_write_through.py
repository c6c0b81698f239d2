"""distill.write_through: an online teacher keeps what it serves and completes it into an ordinary store,
which verifies and trains an offline run to the online run's losses; an interrupted run's spools are
continued by its resumed run."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from pd_dist.core.logits import SparseLogits, truncate
from pd_dist.teacher.stores import SPOOL_DIR, Spool, WriteThrough, latest_records, record_dtype


def _sig(seed: int, b: int = 2, t: int = 5, v: int = 30, k: int = 4) -> SparseLogits:
    z = torch.randn(b, t, v, generator=torch.Generator().manual_seed(seed))
    return truncate(z, 0.9, k, keep_lse=True)


def test_a_spool_cut_by_a_crash_is_continued_with_whole_records(tmp_path):
    """A record cut short (a crash mid-write) is dropped when the spool is reopened, so the resumed run's
    records stay aligned; a sample spooled twice is kept once."""
    a, b = _sig(0), _sig(1)
    sp = Spool(tmp_path, "teacher00001", 5, 4)
    sp.add(0, np.array([3, 7]), a)
    sp.close()
    with open(sp.path, "ab") as fh:
        fh.write(b"\x01" * 100)  # half a record
    sp = Spool(tmp_path, "teacher00001", 5, 4)
    assert sp.path.stat().st_size == 2 * record_dtype(5, 4).itemsize
    sp.add(0, np.array([7, 9]), b)
    sp.close()
    latest = latest_records(tmp_path / SPOOL_DIR, record_dtype(5, 4))
    assert sorted(latest) == [3, 7, 9]
    mm, j = latest[9]
    assert np.array_equal(mm[j]["idx"], b.indices[1].numpy()) and np.array_equal(mm[j]["val"], b.values[1].numpy())
    mm, j = latest[3]
    assert np.array_equal(mm[j]["lse"], a.lse[0].numpy())


def test_write_through_answers_unchanged_and_keeps_only_real_samples(tmp_path):
    answers = {}

    def teacher(tokens, ids=None):
        out = _sig(int(tokens.sum()))
        answers[int(tokens.sum())] = out
        return out

    wt = WriteThrough(teacher, tmp_path, "teacher00000", 5, 4)
    got = wt(torch.full((2, 5), 1), np.array([4, 5]))
    assert got is answers[10]
    wt(torch.full((2, 5), 2), None)  # a padding forward: answered, not kept
    wt.close()
    assert wt.kept == 2
    assert sorted(latest_records(tmp_path / SPOOL_DIR, record_dtype(5, 4))) == [4, 5]


def test_write_through_config_refusals():
    from conftest import SMOKE
    from pd_dist.config import load_config
    from pd_dist.core.configlib import ConfigError

    for sets, needle in [(["distill.mode=colocated"], "needs distill.mode online"),
                         (["distill.mode=online", "generate.top_k=5"], "generate.top_k"),
                         (["distill.mode=online", "teacher.zero_stage=3"], "ZeRO-3")]:
        with pytest.raises(ConfigError, match=needle):
            load_config(SMOKE, ["distill.write_through=/tmp/wt", *sets])


@pytest.mark.multiproc
def test_an_online_run_writes_through_a_store_that_reproduces_it_offline(tmp_path, smoke_data, tiny_teacher_dir):
    """Interrupted after 2 of 4 steps, then resumed: the teacher continues its spool, completes the store
    only at the end (filling what nobody asked for), and an offline run from that store (exact
    encoding) has the online run's per-step losses."""
    from conftest import launch, read_summary
    from pd_dist.store import LogitsStore, verify_store

    wt = tmp_path / "through"
    base = ["train.eval_every=0", "train.log_every=1", "train.steps=4", "train.save_every=2",
            "train.global_batch_size=8", "train.micro_batch_size=4", "distill.alpha.schedule=constant",
            "distill.alpha.value=0.5", "distill.top_k=6", "generate.encoding=exact", "generate.shard_size=700",
            f"data.dir={smoke_data.path}", f"teacher.path={tiny_teacher_dir}"]
    onl, off = tmp_path / "online", tmp_path / "offline"
    online = base + [f"output_dir={onl}", "distill.mode=online", f"distill.write_through={wt}"]
    p = launch(2, online + ["train.exit_after_steps=2"], cwd=tmp_path)
    assert "spools stay in" in p.stdout + p.stderr
    assert not (wt / "manifest.json").exists() and any((wt / SPOOL_DIR).glob("*.bin"))
    p = launch(2, online, cwd=tmp_path, extra_args=["--resume"])
    assert "store complete" in p.stdout + p.stderr
    assert verify_store(wt) == [] and not (wt / SPOOL_DIR).exists()
    info = json.loads((wt / "write_through_info.json").read_text())
    store = LogitsStore(wt)
    # 4 steps x 8 samples trained, the final evaluation's held-out samples asked for too; the rest filled
    assert info["samples_from_spools"] >= 32 and info["samples_from_spools"] + info["samples_filled"] == len(store)
    launch(1, base + [f"output_dir={off}", "distill.mode=offline", f"distill.store={wt}"], cwd=tmp_path)
    a, b = read_summary(onl), read_summary(off)
    assert a["finished"] and len(a["losses"]) == 4
    assert b["losses"] == pytest.approx(a["losses"], rel=1e-5)
    assert b["teacher_val_loss"] == pytest.approx(a["teacher_val_loss"], rel=1e-6)


class _DeadClient:
    """A TeacherClient whose every teacher replica is lost: each answer fails over to nobody."""
    me_desc, peer, failover = "student rank 2 (host2)", 0, True

    def __init__(self):
        self.abandoned = self.closed = False
        self.tickets = 0

    def submit(self, ids, tokens):
        self.tickets += 1
        return self.tickets

    def result(self, ticket):
        from pd_dist.cluster.bridge import PeerError

        raise PeerError("student rank 2 (host2) waiting for logits from teacher rank 1 (host1): peer closed")

    def replicas_alive(self):
        return 0

    def abandon(self):
        self.abandoned = True


class _Windows:
    def batch(self, ids):
        return np.zeros((len(ids), 6), np.int64)


def test_students_fall_back_to_the_write_through_spools_when_every_replica_is_lost(tmp_path):
    """With failover and write-through, the last replica's loss turns the source to the teachers' spools:
    planned micro-batches they hold train on, held-out ones they lack evaluate without KD, and a planned
    one they lack ends the run with the teacher's line and the missing ids."""
    from pd_dist.cluster.bridge import PeerError
    from pd_dist.signals.sources import OnlineTeacher
    from pd_dist.teacher.stores import SpoolReader

    a = _sig(3)
    sp = Spool(tmp_path, "teacher00001", 5, 4)
    sp.add(0, np.array([10, 11]), a)
    sp.close()
    lines = []
    client = _DeadClient()
    src = OnlineTeacher(client, _Windows(), prefetch=1, spools=lambda: SpoolReader(tmp_path, 5, 4), log=lines.append)
    src.plan([np.array([10, 11]), np.array([12, 13])])
    got = src.signal(np.array([10, 11]), torch.zeros(2, 5, dtype=torch.int64))
    assert torch.equal(got.indices, a.indices) and torch.equal(got.values, a.values)
    assert client.abandoned and len(lines) == 1 and "every teacher replica is lost" in lines[0]
    assert src.signal(np.array([40, 41]), torch.zeros(2, 5, dtype=torch.int64)) is None  # held-out: no KD
    with pytest.raises(PeerError, match=r"teacher rank 1 .*lack samples \[12, 13\]"):
        src.signal(np.array([12, 13]), torch.zeros(2, 5, dtype=torch.int64))
    # without write-through spools the loss of the last replica ends the run as before
    bare = OnlineTeacher(_DeadClient(), _Windows(), prefetch=0)
    with pytest.raises(PeerError, match="peer closed"):
        bare.signal(np.array([10, 11]), torch.zeros(2, 5, dtype=torch.int64))
