"""Small models and data that several test files build."""

import torch

from bpe_tokenizer import BPETokenizer
from transformer_model import TransformerConfig, TransformerLM


def endless_model(tokenizer: BPETokenizer) -> TransformerLM:
    """A model that never ends a reply: its final hidden state is a fixed vector u
    (LayerNorm gain 0, bias u) and its head scores <|endoftext|> at -10 u.u, the other tokens
    near 0. Good for interrupting a long stream."""
    torch.manual_seed(0)
    model = TransformerLM(TransformerConfig(vocab_size=tokenizer.vocab_size, hidden_size=16, num_hidden_layers=1,
                                            num_attention_heads=2, intermediate_size=32, max_position_embeddings=32,
                                            window_size=8, tie_word_embeddings=False, dropout=0.0))
    with torch.no_grad():
        u = torch.ones(16) / 4
        model.final_norm.weight.zero_()
        model.final_norm.bias.copy_(u)
        model.lm_head.weight.normal_(0, 0.01)
        model.lm_head.weight[tokenizer.special_tokens["<|endoftext|>"]] = -10 * u
    return model.eval()
