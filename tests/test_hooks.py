"""Step hooks (pd_dist.train.hooks): the student's forward runs a hook's head_output on its hidden
states, and distill.dump_logits (teacher.stores.LogitsDump) spools what it gets under the announced step.
(The whole dump through the launcher: test_offline_launch.test_dump_logits_from_the_teachers_own_pretraining.)"""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import torch

from conftest import SMOKE


def test_dump_hook_spools_the_students_own_truncated_logits(tmp_path, smoke_data):
    from pd_dist.config import load_config
    from pd_dist.core.logits import truncate
    from pd_dist.models import build_model
    from pd_dist.teacher.stores import SPOOL_DIR, LogitsDump, record_dtype
    from pd_dist.train.student import PDStudent

    root = tmp_path / "dumped"
    cfg = load_config(SMOKE, ["distill.mode=none", "distill.dump_logits=true", f"distill.store={root}",
                              f"data.dir={smoke_data.path}"])
    model = build_model(cfg.model, smoke_data.vocab_size, seed=cfg.train.seed).eval()
    student = PDStudent(model, cfg.distill.loss, cfg.distill.loss_temperature, cfg.train.loss_chunk_size)
    dump = LogitsDump(cfg, SimpleNamespace(dp_rank=1), smoke_data, tmp_path / "student")
    assert not (root / SPOOL_DIR).exists()  # nothing is written before the first step
    ids = np.array([3, 5])
    batch = torch.from_numpy(smoke_data.batch(ids))
    inp, tgt = batch[:, :-1], batch[:, 1:]
    dump.on_step(7)
    out = student(inp, tgt, head_fn=dump.head_output)
    assert out.loss.requires_grad and not out.head_output.values.requires_grad
    dump.on_micro_batch(ids, out)
    dump.close(finished=False)  # not finished: the spool is kept, no store is built
    assert not (root / "manifest.json").exists()

    top_p, k = cfg.stored_truncation()
    k = min(k, smoke_data.vocab_size)
    recs = np.fromfile(root / SPOOL_DIR / "rank00001.bin", dtype=record_dtype(smoke_data.seq_len, k))
    assert recs["sample"].tolist() == [3, 5] and recs["step"].tolist() == [7, 7]
    with torch.no_grad():
        want = truncate(model(inp).logits.float(), top_p, k, keep_lse=True)
    for j in range(2):
        got_idx, got_val = torch.from_numpy(recs["idx"][j]).long(), torch.from_numpy(recs["val"][j])
        mask = want.mask[j]
        assert torch.equal(got_idx[mask], want.indices[j][mask])
        assert torch.allclose(got_val[mask], want.values[j][mask], atol=1e-4)
        assert torch.allclose(torch.from_numpy(recs["lse"][j]), want.lse[j], atol=1e-4)
