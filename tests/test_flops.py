"""FLOP counts from model shapes (pd_dist.core.flops) against torch's own FLOP counter run on the built
model, and against the arithmetic written out for one preset."""
from __future__ import annotations

import pytest
import torch


@pytest.mark.parametrize("preset,vocab,context", [("tiny-student", 512, 64), ("small-teacher", 4096, 128)])
def test_forward_flops_match_torch_flop_counter(preset, vocab, context):
    """torch.utils.flop_counter counts every matmul the built model runs (attention included) on one
    sequence of ``context`` tokens: per token it must be the shape's count."""
    from torch.utils.flop_counter import FlopCounterMode

    from pd_dist.models import ModelConfig, build_model, model_shape

    cfg = ModelConfig(preset=preset)
    model = build_model(cfg, vocab, seed=0).eval()
    model.set_attn_implementation("eager")  # attention as matmuls, which the counter sees (CPU SDPA: not)
    ids = torch.randint(0, vocab, (1, context))
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(input_ids=ids)
    got = counter.get_total_flops() / context
    assert model_shape(cfg, vocab).forward_flops(context) == pytest.approx(got, rel=1e-9)


def test_flops_by_hand_for_pd_1_9b():
    """pd-1.9b: hidden 2048, ffn 6912, 24 layers, 16 heads of 128, 2 kv heads; vocab 151552, context 4096.
    Per layer: q, o 2 x 2048 x 2048 = 8,388,608; k, v 2 x 2048 x 256 = 1,048,576; MLP 3 x 2048 x 6912 =
    42,467,328; so 51,904,512 x 24 = 1,245,708,288, plus the head 2048 x 151552 = 310,378,496:
    1,556,086,784 weights, 3,112,173,568 FLOPs; attention 4 x 24 x 4096 x 2048 = 805,306,368.
    Forward 3,917,479,936 FLOPs per token; training 3x: 11,752,439,808."""
    from pd_dist.models import ModelConfig, model_shape

    s = model_shape(ModelConfig(preset="pd-1.9b"), 151552)
    assert s.matmul_params() == 1_556_086_784
    assert s.forward_flops(4096) == 3_917_479_936
    assert s.train_flops(4096) == 11_752_439_808
    with pytest.raises(ValueError, match="context must be >= 1"):
        s.forward_flops(0)


def test_a_saved_model_is_counted_from_its_config(tmp_path):
    from pd_dist.models import ModelConfig, build_model, model_shape

    build_model(ModelConfig(preset="tiny-teacher"), 300, seed=0).save_pretrained(str(tmp_path))
    assert model_shape(ModelConfig(path=str(tmp_path)), 999) == model_shape(ModelConfig(preset="tiny-teacher"), 300)
