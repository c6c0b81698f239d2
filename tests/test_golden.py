"""Golden losses: short smoke runs in every teacher mode must reproduce recorded per-step losses.

The figures in golden_losses.json were recorded from the launcher runs below; any change to the
training path (sources, loss, schedules, data order, checkpointing) that alters a number fails here.
To record them again after a deliberate change of behaviour (say why in the commit):

    PD_DIST_WRITE_GOLDEN=1 python -m pytest tests/test_golden.py
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from conftest import launch, read_summary

pytestmark = pytest.mark.multiproc

GOLDEN = Path(__file__).with_name("golden_losses.json")
STEPS = 6
# Smoke config as shipped (WSD alpha and LR), short; the teacher is the tiny saved one.
COMMON = [f"train.steps={STEPS}", "train.save_every=3", "train.eval_every=0", "train.log_every=1",
          "train.global_batch_size=8", "train.micro_batch_size=4", "optim.warmup_steps=1",
          "distill.top_k=8"]
CASES = {  # name -> (ranks, distill.mode)
    "none": (1, "none"),
    "colocated": (1, "colocated"),
    "online_1_1": (2, "online"),
    "offline": (1, "offline"),
}
FIELDS = ("losses", "val_loss", "teacher_top1_agreement", "final_train_loss")


def _record(summary: dict) -> dict:
    return {k: summary[k] for k in FIELDS}


@pytest.fixture(scope="module")
def golden() -> dict:
    return json.loads(GOLDEN.read_text()) if GOLDEN.is_file() else {}


@pytest.mark.parametrize("case", list(CASES))
def test_golden_losses(case, golden, tmp_path, smoke_data, tiny_teacher_dir, request):
    ranks, mode = CASES[case]
    out = tmp_path / "run"
    over = COMMON + [f"output_dir={out}", f"data.dir={smoke_data.path}", f"teacher.path={tiny_teacher_dir}",
                     f"distill.mode={mode}"]
    if mode == "offline":
        # 1-rank generation, top-8, the smoke config's generate settings (shared with test_layouts)
        over.append(f"distill.store={request.getfixturevalue('store_1rank_top8')}")
    launch(ranks, over, cwd=tmp_path)
    got = _record(read_summary(out))
    assert len(got["losses"]) == STEPS
    if os.environ.get("PD_DIST_WRITE_GOLDEN"):
        data = json.loads(GOLDEN.read_text()) if GOLDEN.is_file() else {}
        data["data_fingerprint"] = smoke_data.fingerprint
        data[case] = got
        GOLDEN.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
        return
    assert case in golden, f"no golden figures for {case}: record them (see the module docstring)"
    assert golden["data_fingerprint"] == smoke_data.fingerprint, (
        "the smoke corpus differs from the one the golden losses were recorded on (another Python "
        "standard library?): record them again on this machine")
    want = golden[case]
    assert got["losses"] == pytest.approx(want["losses"], rel=2e-5, abs=1e-6)
    assert got["final_train_loss"] == pytest.approx(want["final_train_loss"], rel=2e-5, abs=1e-6)
    assert got["val_loss"] == pytest.approx(want["val_loss"], rel=2e-5)
    if want["teacher_top1_agreement"] is None:
        assert got["teacher_top1_agreement"] is None
    else:
        assert got["teacher_top1_agreement"] == pytest.approx(want["teacher_top1_agreement"], abs=1e-6)
