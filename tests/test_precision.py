from __future__ import annotations

import pytest
import torch

from irep_deploy.precision import exact_fp32


@pytest.mark.parametrize("cudnn,matmul", [(True, True), (True, False), (False, True)])
def test_exact_fp32_turns_tf32_off_and_restores_the_callers_setting(cudnn, matmul):
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = cudnn, matmul
        with exact_fp32():
            assert torch.backends.cudnn.allow_tf32 is False
            assert torch.backends.cuda.matmul.allow_tf32 is False
        assert (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32) == (cudnn, matmul)
        with pytest.raises(KeyError):
            with exact_fp32():
                raise KeyError("boom")
        assert (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32) == (cudnn, matmul)
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved
