"""The released checkpoints load into today's model unchanged: the same state-dict keys (the
load is strict) and the same next-token predictions as the code that trained them. The
expected values were computed with that code on the prompt below: for the ablation model,
commit 52c8890 (before the redesign of issue 15); for the base and chat models, the code of
their release (issues 16 and 17; the base model is calibrated: its temperature is folded into
the weights, so its logits are smaller than an uncalibrated model's)."""

import pytest
import torch

from conftest import REPO
from transformer_model import load_checkpoint

PROMPT = "Once upon a time there was a little girl named Lily. She"
EXPECTED = {  # the argmax at every position, and the largest logit at the last one
    "tinystories_base": ([440, 258, 394, 44, 279, 258, 386, 441, 488, 1254, 46, 315, 507], 13.2356),
    "tinystories_chat": ([440, 258, 394, 44, 279, 258, 386, 441, 488, 376, 46, 315, 507], 15.0897),
    "ablation_pos_learned": ([439, 258, 393, 44, 279, 258, 385, 441, 487, 378, 46, 315, 503], 9.0913),
}


@pytest.mark.parametrize("name", EXPECTED)
def test_a_released_checkpoint_predicts_what_it_did_when_it_was_released(name):
    model, tokenizer, _ = load_checkpoint(REPO / "pretrained" / f"{name}.pth", device="cpu")
    ids = torch.tensor([tokenizer.encode(PROMPT)])
    with torch.no_grad():
        logits = model(ids).logits[0]
    tokens, largest = EXPECTED[name]
    assert logits.argmax(-1).tolist() == tokens
    assert logits[-1].max().item() == pytest.approx(largest, abs=1e-3)
