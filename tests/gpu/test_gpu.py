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
