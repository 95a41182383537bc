"""The SDPA kernel choice for generation (eve.attention_backends)."""

import torch

from eve.attention_backends import varying_shape_attention


def _flags():
    b = torch.backends.cuda
    return b.cudnn_sdp_enabled(), b.flash_sdp_enabled(), b.mem_efficient_sdp_enabled(), b.math_sdp_enabled()


def test_cuda_generation_leaves_cudnn_out_and_restores_the_flags():
    before = _flags()
    assert before[0], "torch's default enables cuDNN attention"
    with varying_shape_attention("cuda:0"):
        assert _flags() == (False, True, True, True)
    assert _flags() == before


def test_other_devices_are_left_alone():
    before = _flags()
    with varying_shape_attention(torch.device("cpu")):
        assert _flags() == before
