"""GPU-only checks (bf16 kernels, NCCL role worlds): skipped where there is no CUDA device."""
from __future__ import annotations

import pytest
import torch

from conftest import launch, read_summary

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@cuda
def test_fused_loss_bf16_on_cuda_matches_fp32_reference():
    from pd_dist.core.logits import truncate
    from pd_dist.core.losses import fused_pd_loss, pd_loss_reference

    g = torch.Generator(device="cuda").manual_seed(0)
    h = torch.randn(512, 256, device="cuda", generator=g)
    w = torch.randn(8192, 256, device="cuda", generator=g) * 0.05
    t = torch.randint(0, 8192, (512,), device="cuda", generator=g)
    teacher = truncate(torch.randn(512, 8192, device="cuda", generator=g) * 3, 0.95, 50)
    ref = pd_loss_reference(h.double(), w.double(), t, teacher.to(dtype=torch.float64), 0.5, "kld", 1.0, 512.0)
    hb, wb = h.bfloat16().requires_grad_(), w.bfloat16().requires_grad_()
    out = fused_pd_loss(hb, wb, t, teacher, 0.5, "kld", 1.0, 512.0, chunk_size=128)
    out.loss.backward()
    assert out.loss.item() == pytest.approx(ref.loss.item(), rel=2e-2)
    assert torch.isfinite(hb.grad).all() and torch.isfinite(wb.grad).all()


@cuda
@pytest.mark.multiproc
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices")
def test_colocated_bf16_two_gpus(tmp_path, smoke_data, tiny_teacher_dir):
    launch(2, [f"output_dir={tmp_path / 'r'}", f"data.dir={smoke_data.path}", f"teacher.path={tiny_teacher_dir}",
               "train.steps=4", "train.zero_stage=2", "train.precision=bf16"], cwd=tmp_path)
    s = read_summary(tmp_path / "r")
    assert s["finished"] and all(torch.isfinite(torch.tensor(s["losses"])))


@pytest.mark.multiproc
def test_gpu_bench_tiny_runs_every_arm_end_to_end(tmp_path):
    """bench/gpu.py --tiny: the same jobs as on a GPU (LM-only, colocated, offline after generation,
    online with two processes on one device) on tiny shapes; every ratio comes from real runs."""
    import json
    import math
    import subprocess
    import sys

    from conftest import REPO

    proc = subprocess.run([sys.executable, str(REPO / "bench" / "gpu.py"), "--tiny", "--work", str(tmp_path)],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    for key in ("mfu_lm_only", "offline_over_lm", "colocated_over_lm", "online_over_lm", "truncate_hbm_frac"):
        assert math.isfinite(result[key]) and result[key] > 0, (key, result[key])
    assert set(result["tokens_per_sec"]) == {"lm_only", "colocated", "offline", "online"}
    for arm in result["tokens_per_sec"]:
        summary = json.loads((tmp_path / "tiny" / arm / "summary.json").read_text())
        assert summary["finished"] and math.isfinite(summary["tokens_per_sec"])
        # the distilled arms trained against a teacher signal; LM-only against none
        assert (summary["teacher_top1_agreement"] is None) == (arm == "lm_only"), (arm, summary)


def test_gpu_bench_without_cuda_says_so_in_one_line():
    import subprocess
    import sys

    from conftest import REPO

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "gpu.py")], capture_output=True, text=True)
    assert proc.returncode == 0 and len(proc.stdout.strip().splitlines()) == 1
    assert "no CUDA device" in proc.stdout
