"""GPU: the 0.5B card imported at TP=1 and TP=2, logits against HF on the same GPUs (run on the device machine)."""

import pytest
import torch

pytestmark = pytest.mark.gpu


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_half_billion_card_logits_match_hf_at_tp1_and_tp2():
    from validate_import import main

    rows = main(["--card", "falcon-h1-0.5b", "--tp", "1,2", "--seq-len", "512"])
    assert len(rows) == 4 and all(r["passed"] for r in rows), rows
