"""GPU: the 0.5B card through import, reshard (TP 1/2/4), µP fold and export, logits against HF on the same GPUs.
Run on the device machine (see docs/VALIDATION.md)."""

import pytest
import torch

pytestmark = pytest.mark.gpu


@pytest.mark.skipif(torch.cuda.device_count() < 4, reason="needs 4 GPUs")
def test_half_billion_card_on_four_gpus():
    from validate import main

    rows = main(["--card", "falcon-h1-0.5b", "--tp", "1,2,4", "--seq-len", "512"])
    assert len(rows) == 8 and all(r["passed"] for r in rows), rows


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU and onebitllms")
def test_onebitllms_bf16_kernels_agree_with_the_torch_reference():
    """The kernels the BitNet layers use on GPU (bf16 activations) against falcon_bridge.core.ternary: equal but for
    .5 ties. fp32 activations are not asserted: the kernel disagrees there (see docs/VALIDATION.md) and is not used."""
    from validate_bitnet import kernel_agreement

    agreement = kernel_agreement()
    assert agreement["activation_torch.bfloat16"]["differing_fraction"] < 0.01
    assert agreement["weight_torch.bfloat16"]["differing_fraction"] == 0.0


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_bitnet_half_billion_card_trains_and_exports_packed():
    from validate_bitnet import main

    assert main(["--card", "falcon-h1-0.5b", "--tp", "2", "--steps", "6", "--seq-len", "256"])["passed"]
