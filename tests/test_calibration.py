"""calibration.py: the temperature that minimises held-out loss, found by Newton's method and
checked against autograd and a brute-force search, and folded into the weights exactly."""

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from calibration import fit_inverse_temperature, fold_temperature, head_norm, temperature_derivatives
from evaluation import loss_totals
from tinystories_data import TokenWindows
from transformer_model import TransformerConfig, TransformerLM

VOCAB = 50


class FixedLogits(torch.nn.Module):
    """A stand-in model whose logits for window i are a fixed random tensor."""

    def __init__(self, logits: torch.Tensor):
        super().__init__()
        self.table = logits  # (windows, seq, vocab)

    def forward(self, inputs):
        return SimpleNamespace(logits=self.table[inputs[:, 0]])


class IndexedWindows(torch.utils.data.Dataset):
    """Item i: inputs that name window i, and its targets (some -100)."""

    def __init__(self, targets: torch.Tensor):
        self.targets = targets

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, i):
        return torch.full((self.targets.size(1),), i), self.targets[i]


def sampled_targets(logits, generator):
    """One target per position, drawn from softmax(logits)."""
    return torch.multinomial(logits.softmax(-1).flatten(0, 1), 1, generator=generator).view(logits.shape[:-1])


def overconfident_problem(windows=6, seq=12, seed=0):
    """Logits 2.5 times too peaked for the targets, which are drawn from softmax(logits / 2.5);
    a few targets left out."""
    generator = torch.Generator().manual_seed(seed)
    logits = 5 * torch.randn(windows, seq, VOCAB, generator=generator)
    targets = sampled_targets(logits / 2.5, generator)
    targets[0, :3] = -100
    return FixedLogits(logits), IndexedWindows(targets), logits, targets


def held_out_loss(logits, targets, inverse_temperature):
    return F.cross_entropy((inverse_temperature * logits).flatten(0, 1), targets.flatten(), ignore_index=-100,
                           reduction="sum")


def test_the_derivatives_are_autograds():
    model, data, logits, targets = overconfident_problem()
    b = torch.tensor(0.7, dtype=torch.float64, requires_grad=True)
    first, = torch.autograd.grad(held_out_loss(logits.double(), targets, b), b, create_graph=True)
    second, = torch.autograd.grad(first, b)
    ours = temperature_derivatives(model, data, [[0, 1, 2], [3, 4, 5]], torch.device("cpu"), None, 0.7)
    assert ours == pytest.approx([first.item(), second.item()], rel=1e-4)


def test_newton_finds_the_brute_force_minimum():
    model, data, logits, targets = overconfident_problem()
    grid = torch.arange(0.01, 3.0, 0.0005)
    brute_force = grid[torch.stack([held_out_loss(logits, targets, b) for b in grid]).argmin()].item()

    def derivatives(b):
        return temperature_derivatives(model, data, [[0, 1, 2, 3, 4, 5]], torch.device("cpu"), None, b)

    fitted = fit_inverse_temperature(derivatives)
    assert fitted == pytest.approx(brute_force, abs=1e-3)
    assert fitted < 1  # overconfident logits are softened: T = 1 / b > 1
    assert held_out_loss(logits, targets, fitted) < held_out_loss(logits, targets, 1.0)


def test_a_model_already_calibrated_keeps_temperature_one():
    """Targets drawn from the model's own softmax: the best b is about 1."""
    generator = torch.Generator().manual_seed(1)
    logits = 2 * torch.randn(40, 50, VOCAB, generator=generator)
    targets = sampled_targets(logits, generator)
    model, data = FixedLogits(logits), IndexedWindows(targets)
    fitted = fit_inverse_temperature(
        lambda b: temperature_derivatives(model, data, [list(range(40))], torch.device("cpu"), None, b))
    assert fitted == pytest.approx(1.0, abs=0.05)


def test_the_loss_at_a_temperature_divides_the_logits():
    model, data, logits, targets = overconfident_problem()
    token_bytes = torch.ones(VOCAB, dtype=torch.float64)
    nats, counted, _ = loss_totals(model, data, [[0, 1, 2, 3, 4, 5]], torch.device("cpu"), None, token_bytes,
                                   temperature=1.6)
    assert counted == (targets != -100).sum().item()
    assert nats == pytest.approx(held_out_loss(logits, targets, 1 / 1.6).item(), rel=1e-5)


@pytest.mark.parametrize("overrides", [
    {},
    {"bias": False},
    {"norm_position": "post"},
    {"tie_word_embeddings": False, "position_embedding": "rope", "skip_weights": True},
])
def test_folding_the_temperature_divides_every_logit(overrides):
    config = TransformerConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                               intermediate_size=64, max_position_embeddings=64, window_size=16, dropout=0.0,
                               **overrides)
    torch.manual_seed(0)
    model = TransformerLM(config).eval()
    with torch.no_grad():  # a trained-looking final norm, not the initial ones and zeros
        for parameter in head_norm(model).parameters():
            parameter.add_(0.3 * torch.randn_like(parameter))
    ids = torch.randint(0, VOCAB, (2, 20), generator=torch.Generator().manual_seed(1))
    before = model(ids).logits
    fold_temperature(model, 1.25)
    torch.testing.assert_close(model(ids).logits, before / 1.25, rtol=1e-5, atol=1e-5)


def test_a_real_model_on_real_windows_is_fitted_end_to_end():
    """The pieces together on a tiny transformer: the fitted temperature lowers the loss on
    the windows it was fitted on, and the folded model scores that lower loss at temperature 1."""
    torch.manual_seed(0)
    model = TransformerLM(TransformerConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1,
                                            num_attention_heads=4, intermediate_size=64,
                                            max_position_embeddings=32, window_size=None, dropout=0.0))
    with torch.no_grad():
        model.embed_tokens.weight.mul_(40)  # wildly overconfident
    windows = TokenWindows(torch.randint(0, VOCAB, (400,)).numpy(), 16)
    batches = [list(range(len(windows)))]
    device, bytes_ = torch.device("cpu"), torch.ones(VOCAB, dtype=torch.float64)
    temperature = 1 / fit_inverse_temperature(
        lambda b: temperature_derivatives(model, windows, batches, device, None, b))
    raw = loss_totals(model, windows, batches, device, None, bytes_)[0]
    at_temperature = loss_totals(model, windows, batches, device, None, bytes_, temperature)[0]
    assert temperature > 1 and at_temperature < raw
    fold_temperature(model, temperature)
    assert loss_totals(model, windows, batches, device, None, bytes_)[0] == pytest.approx(at_temperature, rel=1e-5)
