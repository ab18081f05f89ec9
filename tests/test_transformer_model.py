"""TransformerLM: attention checked against torch's fused kernel, the KV cache against full
recomputation, the loss against F.cross_entropy, the model against Hugging Face GPT-2, and
checkpoints against every way a file can be wrong."""

import dataclasses
import errno
import itertools
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from bpe_tokenizer import BPETokenizer
from common import autocast_dtype, cpu_has_native_bf16, pick_device, temporary_name, write_atomically
from transformer_model import (
    POSITION_EMBEDDINGS,
    CheckpointError,
    FeedForward,
    FusedAttention,
    MultiHeadAttention,
    TransformerConfig,
    TransformerLM,
    alibi_slopes,
    attention_mask,
    load_checkpoint,
    local_block_attention,
    local_blocks,
    save_checkpoint,
    scaled_dot_product_attention,
)

VOCAB = 300


def tiny_config(**overrides) -> TransformerConfig:
    settings = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                    intermediate_size=64, max_position_embeddings=64, window_size=None, dropout=0.0)
    return TransformerConfig(**{**settings, **overrides})


def tiny_model(**overrides) -> TransformerLM:
    torch.manual_seed(0)
    return TransformerLM(tiny_config(**overrides)).eval()


def random_ids(batch=2, seq=20, seed=1):
    return torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


SCHEMES = list(itertools.product(POSITION_EMBEDDINGS, [None, 4]))
scheme_ids = [f"{p}-window{w}" for p, w in SCHEMES]

# The architecture switches (off by default), one at a time and all together.
SWITCHES = [dict(qk_norm=True), dict(activation="relu2"), dict(skip_weights=True), dict(zero_init_projections=True),
            dict(qk_norm=True, activation="relu2", skip_weights=True, zero_init_projections=True)]
switch_ids = ["qk_norm", "relu2", "skip_weights", "zero_init_projections", "all"]


def switched_model(**overrides) -> TransformerLM:
    """A tiny model with switches on and every weight moved off its initial value, so that
    zero-initialised projections and (1, 0) skip weights do not hide anything."""
    model = tiny_model(**overrides)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))
    return model


def tokenizer_of_size(vocab_size: int) -> BPETokenizer:
    rng = np.random.default_rng(0)
    words = ["".join(rng.choice(list("abcdefghij"), size=rng.integers(2, 8))) for _ in range(3000)]
    return BPETokenizer.train([" ".join(words)], vocab_size=vocab_size)


@pytest.fixture(scope="module")
def tokenizer() -> BPETokenizer:
    return tokenizer_of_size(VOCAB)


# ------------------------------------------------------------------- configuration

def test_default_config_is_the_seeds():
    config = TransformerConfig()
    assert (config.vocab_size, config.hidden_size, config.num_hidden_layers, config.num_attention_heads,
            config.intermediate_size, config.max_position_embeddings, config.window_size, config.dropout) == (
        10000, 256, 4, 8, 1024, 512, 256, 0.1)
    assert config.position_embedding == "sinusoidal" and config.norm_position == "pre"
    assert TransformerConfig.from_dict(config.to_dict()) == config
    assert TransformerConfig(window_size=0).window_size is None


@pytest.mark.parametrize("overrides, message", [
    (dict(hidden_size=250), r"hidden_size \(250\) must be divisible by num_attention_heads \(8\)"),
    (dict(window_size=1024), r"window_size \(1024\) is larger than the context, max_position_embeddings \(512\)"),
    (dict(position_embedding="absolute"), "position_embedding 'absolute' is not one of"),
    (dict(norm_position="middle"), "norm_position 'middle' is not one of pre, post"),
    (dict(activation="relu"), "activation 'relu' is not one of gelu, gelu_tanh"),
    (dict(attention_impl="flash"), "attention_impl 'flash' is not one of sdpa, manual"),
    (dict(num_hidden_layers=0), "num_hidden_layers must be a positive integer"),
    (dict(dropout=1.0), r"dropout must be in \[0, 1\)"),
    (dict(dropout=float("nan")), r"dropout must be in \[0, 1\), not nan"),
    (dict(rope_theta=0.0), "rope_theta must be a positive finite number, not 0.0"),
    (dict(layer_norm_eps=float("nan")), "layer_norm_eps must be a positive finite number, not nan"),
    (dict(initializer_range=float("inf")), "initializer_range must be a positive finite number, not inf"),
    (dict(hidden_size=24, num_attention_heads=8, position_embedding="rope"), "rope needs an even head size"),
])
def test_invalid_configs_say_which_field_and_why(overrides, message):
    with pytest.raises(ValueError, match=message):
        TransformerConfig(**overrides)


def test_unknown_config_keys_are_named():
    with pytest.raises(ValueError, match=r"unknown config key.*: n_embd"):
        TransformerConfig.from_dict({**TransformerConfig().to_dict(), "n_embd": 3})


def test_default_model_has_5_7_million_parameters():
    model = TransformerLM(TransformerConfig())
    assert model.num_parameters() == 5_719_552  # 2,560,000 of them in the tied embedding
    assert model.num_parameters(exclude_embeddings=True) == 3_159_552


# ----------------------------------------------------------------------- attention

def test_written_out_attention_equals_torch_sdpa_for_every_kind_of_mask():
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 4, 9, 8) for _ in range(3))
    columns = torch.arange(9)
    padding = torch.ones(2, 9, dtype=torch.bool)
    padding[1, :3] = False
    masks = [
        None,
        attention_mask(columns, columns, None),
        attention_mask(columns, columns, 3),
        attention_mask(columns, columns, 3, key_valid=padding),
        attention_mask(columns, columns, None, alibi_slopes=alibi_slopes(4)),
        attention_mask(columns, columns, 4, key_valid=padding, alibi_slopes=alibi_slopes(4)),
    ]
    for mask in masks:
        ours, weights = scaled_dot_product_attention(q, k, v, mask, return_weights=True)
        torch.testing.assert_close(ours, F.scaled_dot_product_attention(q, k, v, attn_mask=mask))
        torch.testing.assert_close(weights.sum(-1), torch.ones(2, 4, 9))


@pytest.mark.parametrize("alibi", [False, True])
@pytest.mark.parametrize("seq", [9, 12, 13])
def test_local_attention_in_blocks_equals_one_call_with_the_full_mask(seq, alibi):
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 4, seq, 8) for _ in range(3))
    slopes = alibi_slopes(4) if alibi else None
    columns = torch.arange(seq)
    full = F.scaled_dot_product_attention(q, k, v, attn_mask=attention_mask(columns, columns, 4, None, slopes))
    torch.testing.assert_close(local_block_attention(q, k, v, local_blocks(4, slopes)), full)


def test_local_attention_mask_is_causal_and_windowed():
    columns = torch.arange(6)
    mask = attention_mask(columns, columns, window_size=2)
    i, j = torch.meshgrid(columns, columns, indexing="ij")
    assert torch.equal(mask, (j <= i) & (i - 2 < j))


@pytest.mark.parametrize("position_embedding, window", SCHEMES, ids=scheme_ids)
def test_written_out_and_fused_attention_give_the_same_model(position_embedding, window):
    model = tiny_model(position_embedding=position_embedding, window_size=window)
    manual = TransformerLM(dataclasses.replace(model.config, attention_impl="manual")).eval()
    manual.load_state_dict(model.state_dict())  # the same weights: the same keys
    assert type(model.blocks[0].attention) is FusedAttention and type(manual.blocks[0].attention) is MultiHeadAttention
    ids = random_ids()
    torch.testing.assert_close(manual(ids).logits, model(ids).logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("position_embedding", POSITION_EMBEDDINGS)
def test_future_tokens_never_change_past_logits(position_embedding):
    model = tiny_model(position_embedding=position_embedding, window_size=4)
    ids = random_ids(1, 16)
    changed = ids.clone()
    changed[0, 10:] = (changed[0, 10:] + 1) % VOCAB
    torch.testing.assert_close(model(changed).logits[:, :10], model(ids).logits[:, :10])


@pytest.mark.parametrize("layers", [1, 3])
@pytest.mark.parametrize("position_embedding", POSITION_EMBEDDINGS)
def test_a_window_bounds_how_far_back_a_token_has_influence(position_embedding, layers):
    """Each layer looks window - 1 tokens back, so n layers see n * (window - 1) back.
    (Large initial weights, so that the influence at the edge is well above rounding.)"""
    window, last = 4, 30
    model = tiny_model(position_embedding=position_embedding, window_size=window, num_hidden_layers=layers,
                       initializer_range=0.5)
    ids = random_ids(1, last + 1)
    reach = layers * (window - 1)

    def last_logits_after_changing(position):
        changed = ids.clone()
        changed[0, position] = (changed[0, position] + 1) % VOCAB
        return model(changed).logits[0, last]

    base = model(ids).logits[0, last]
    assert torch.equal(last_logits_after_changing(last - reach - 1), base)  # exactly no influence
    assert not torch.equal(last_logits_after_changing(last - reach), base)


def test_attention_weights_are_returned_per_layer_and_show_the_window():
    model = tiny_model(window_size=3)
    out = model(random_ids(2, 10), output_attentions=True)
    assert len(out.attentions) == 2
    weights = out.attentions[0]
    assert weights.shape == (2, 4, 10, 10)
    i, j = torch.meshgrid(torch.arange(10), torch.arange(10), indexing="ij")
    outside = (j > i) | (j <= i - 3)
    assert torch.all(weights[..., outside] == 0)
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, 4, 10))


# ---------------------------------------------------------- switches (qk_norm, ...)

@pytest.mark.parametrize("switches", SWITCHES, ids=switch_ids)
@pytest.mark.parametrize("position_embedding, window", [("rope", 4), ("alibi", None), ("learned", 8)])
def test_each_switch_keeps_written_out_equal_to_fused_and_the_cache_equal_to_a_full_forward(
        switches, position_embedding, window):
    model = switched_model(position_embedding=position_embedding, window_size=window, **switches)
    manual = TransformerLM(dataclasses.replace(model.config, attention_impl="manual")).eval()
    manual.load_state_dict(model.state_dict())
    ids = random_ids(2, 20)
    full = model(ids).logits
    torch.testing.assert_close(manual(ids).logits, full, atol=1e-5, rtol=1e-5)
    cache = model.new_cache(2)
    chunks = [model(ids[:, a:b], past_key_values=cache).logits for a, b in ((0, 7), (7, 8), (8, 20))]
    torch.testing.assert_close(torch.cat(chunks, dim=1), full, atol=1e-5, rtol=1e-5)


def test_qk_norm_makes_attention_blind_to_the_scale_of_queries_and_keys():
    def logits_with_queries_and_keys_scaled(model, factor):
        with torch.no_grad():
            for block in model.blocks:
                block.attention.qkv.weight[: 2 * 32] *= factor  # the query and key rows
                block.attention.qkv.bias[: 2 * 32] *= factor
        return model(random_ids()).logits

    for qk_norm, same in ((True, True), (False, False)):
        plain = tiny_model(qk_norm=qk_norm, position_embedding="rope")(random_ids()).logits
        scaled = logits_with_queries_and_keys_scaled(tiny_model(qk_norm=qk_norm, position_embedding="rope"), 10.0)
        assert torch.allclose(plain, scaled, atol=1e-4) == same


def test_relu2_is_relu_squared_between_the_two_layers():
    feed_forward = FeedForward(tiny_config(activation="relu2"))
    x = torch.randn(2, 5, 32)
    expected = feed_forward.fc2(F.relu(feed_forward.fc1(x)) ** 2)
    torch.testing.assert_close(feed_forward(x), expected)


def test_zero_initialised_projections_start_every_block_as_the_identity():
    model = tiny_model(zero_init_projections=True)
    for block in model.blocks:
        assert not block.attention.proj.weight.any() and not block.feed_forward.fc2.weight.any()
    ids = random_ids()
    x = model.embed_tokens(ids) * math.sqrt(32) + model.sinusoidal_table[: ids.size(1)]
    torch.testing.assert_close(model(ids).logits, model.final_norm(x) @ model.embed_tokens.weight.T)


def test_skip_weights_start_as_the_plain_model_and_mix_in_the_embedded_input():
    with_skips = switched_model(skip_weights=True)
    plain = tiny_model()
    plain.load_state_dict({k: v for k, v in with_skips.state_dict().items() if k != "skip_weights"})
    ids = random_ids()
    with torch.no_grad():
        with_skips.skip_weights.copy_(torch.tensor([[1.0, 0.0], [1.0, 0.0]]))
        torch.testing.assert_close(with_skips(ids).logits, plain(ids).logits)
        with_skips.skip_weights[1, 1] = 0.5
    assert not torch.allclose(with_skips(ids).logits, plain(ids).logits)
    assert TransformerLM(tiny_config(skip_weights=True)).skip_weights.tolist() == [[1.0, 0.0], [1.0, 0.0]]


# ------------------------------------------------------------------------ KV cache

@pytest.mark.parametrize("position_embedding, window", SCHEMES, ids=scheme_ids)
def test_decoding_one_token_at_a_time_on_the_cache_equals_a_full_forward(position_embedding, window):
    model = tiny_model(position_embedding=position_embedding, window_size=window)
    ids = random_ids(2, 20)  # five times the window: the ring buffer wraps around
    full = model(ids).logits
    out = model(ids[:, :7], use_cache=True)
    steps = [out.logits]
    for t in range(7, 20):
        steps.append(model(ids[:, t : t + 1], past_key_values=out.past_key_values).logits)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)
    assert out.past_key_values.capacity == (window or 64)


@pytest.mark.parametrize("position_embedding, window", SCHEMES, ids=scheme_ids)
def test_feeding_chunks_on_the_cache_equals_a_full_forward(position_embedding, window):
    model = tiny_model(position_embedding=position_embedding, window_size=window)
    ids = random_ids(2, 20)
    cache = model.new_cache(2)
    chunks = [model(ids[:, a:b], past_key_values=cache).logits for a, b in ((0, 3), (3, 12), (12, 13), (13, 20))]
    torch.testing.assert_close(torch.cat(chunks, dim=1), model(ids).logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("position_embedding, window", SCHEMES, ids=scheme_ids)
def test_a_left_padded_batch_gives_each_row_its_own_logits(position_embedding, window):
    model = tiny_model(position_embedding=position_embedding, window_size=window)
    long, short, more = random_ids(1, 9, seed=2), random_ids(1, 5, seed=3), random_ids(2, 6, seed=4)
    batch = torch.cat([long, F.pad(short, (4, 0))])
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, :4] = 0
    out = model(batch, attention_mask=mask, use_cache=True)
    steps = [out.logits] + [model(more[:, t : t + 1], past_key_values=out.past_key_values).logits for t in range(6)]
    logits = torch.cat(steps, dim=1)
    torch.testing.assert_close(logits[0], model(torch.cat([long, more[:1]], 1)).logits[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits[1, 4:], model(torch.cat([short, more[1:]], 1)).logits[0], atol=1e-5, rtol=1e-5)
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("position_embedding", ["sinusoidal", "rope", "alibi", "none"])
def test_with_a_window_decoding_runs_past_the_position_table_in_bounded_memory(position_embedding):
    model = tiny_model(position_embedding=position_embedding, window_size=4, max_position_embeddings=16)
    ids = random_ids(1, 40)
    out = model(ids[:, :1], use_cache=True)
    steps = [out.logits] + [model(ids[:, t : t + 1], past_key_values=out.past_key_values).logits for t in range(1, 40)]
    assert out.past_key_values.keys[0].shape[2] == 4
    torch.testing.assert_close(torch.cat(steps, 1), model(ids).logits, atol=1e-5, rtol=1e-5)


def test_learned_positions_refuse_a_sequence_longer_than_their_table():
    model = tiny_model(position_embedding="learned", max_position_embeddings=16)
    with pytest.raises(ValueError, match="learned position embeddings stop at max_position_embeddings - 1 = 15"):
        model(random_ids(1, 17))


# ------------------------------------------------------------------ loss, gradients

def test_loss_is_cross_entropy_ignoring_minus_100_in_training_and_in_evaluation():
    model = tiny_model(dropout=0.0)
    ids, targets = random_ids(2, 12), random_ids(2, 12, seed=5)
    targets[0, :5] = -100
    logits = model(ids).logits
    expected = F.cross_entropy(logits.view(-1, VOCAB), targets.view(-1), ignore_index=-100)
    with torch.no_grad():
        evaluated = model(ids, targets=targets)
    torch.testing.assert_close(evaluated.loss, expected)
    model.train()
    trained = model(ids, targets=targets)
    torch.testing.assert_close(trained.logits, logits)
    torch.testing.assert_close(trained.loss, expected)


@pytest.mark.parametrize("overrides", [{}, dict(norm_position="post", position_embedding="learned"),
                                       dict(tie_word_embeddings=False, position_embedding="rope"),
                                       dict(qk_norm=True, activation="relu2", skip_weights=True)])
def test_gradient_reaches_every_parameter(overrides):
    model = tiny_model(**overrides).train()
    model(random_ids(), targets=random_ids(seed=6)).loss.backward()
    for name, parameter in model.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name


# --------------------------------------------------------------------- checkpoints

def test_save_then_load_gives_identical_logits_and_metadata(tmp_path, tokenizer):
    model = tiny_model(position_embedding="rope", window_size=8)
    path = tmp_path / "model.pth"
    history = [{"step": 10, "train_loss": 3.5, "val_loss": 3.6}]
    save_checkpoint(path, model, tokenizer, step=10, history=history, best=np.float32(3.6), order=np.arange(3))
    loaded, loaded_tokenizer, metadata = load_checkpoint(path, device="cpu")
    ids = random_ids()
    torch.testing.assert_close(loaded(ids).logits, model(ids).logits, atol=0, rtol=0)
    assert loaded.config == model.config and not loaded.training
    assert loaded_tokenizer.merges == tokenizer.merges
    assert metadata["step"] == 10 and metadata["history"] == history
    assert metadata["best"] == pytest.approx(3.6) and metadata["order"].tolist() == [0, 1, 2]
    assert [p.name for p in tmp_path.iterdir()] == ["model.pth"]  # no temporary file left behind


@pytest.mark.parametrize("failure, message", [
    # torch.save's own words when the disk fills up part-way (seen on a full disk)
    (RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 4096 vs 3998"),
     r"cannot write .*model.pth: the write failed \(\[enforce fail .*\); is the disk full\?"),
    (OSError(errno.ENOSPC, "No space left on device"), r"cannot write .*model.pth: No space left on device"),
    (OSError(errno.EROFS, "Read-only file system"), r"cannot write .*model.pth: Read-only file system"),
])
def test_a_failed_save_is_one_line_leaves_no_temporary_file_and_keeps_the_old_checkpoint(
        tmp_path, tokenizer, monkeypatch, failure, message):
    path = tmp_path / "model.pth"
    save_checkpoint(path, tiny_model(), tokenizer, step=1)

    def write_half_then_fail(payload, file):
        with open(file, "wb") as f:
            f.write(b"half a checkpoint")
        raise failure

    monkeypatch.setattr(torch, "save", write_half_then_fail)
    with pytest.raises(OSError, match=message):
        save_checkpoint(path, tiny_model(hidden_size=64), tokenizer, step=2)
    assert [p.name for p in tmp_path.iterdir()] == ["model.pth"]
    monkeypatch.undo()
    assert load_checkpoint(path)[2]["step"] == 1


def test_a_save_removes_the_temporary_files_of_killed_processes_and_keeps_any_other(tmp_path, tokenizer):
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead, alive = int(finished.stdout), os.getppid()
    kept = [temporary_name("model.pth", alive),  # a save in progress
            temporary_name("model.pth", dead) + ".bak",  # not a name write_atomically makes
            f"model.pth.tmp-another-machine-{dead}",  # its process id means nothing here
            temporary_name("other.pth", dead)]  # another file's
    for name in [temporary_name("model.pth", dead), *kept]:
        (tmp_path / name).write_bytes(b"half a checkpoint")
    save_checkpoint(tmp_path / "model.pth", tiny_model(), tokenizer)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["model.pth", *kept])
    (tmp_path / temporary_name("tokens.npy", dead, ".npy")).write_bytes(b"half a cache")  # np.save's suffix
    write_atomically(tmp_path / "tokens.npy", lambda tmp: np.save(tmp, np.arange(3)), suffix=".npy")
    assert not (tmp_path / temporary_name("tokens.npy", dead, ".npy")).exists()


def test_a_checkpoint_path_that_is_a_folder_is_refused_before_writing(tmp_path, tokenizer):
    with pytest.raises(OSError, match=r"cannot write .*: it is a folder; give a file name"):
        save_checkpoint(tmp_path, tiny_model(), tokenizer)
    assert list(tmp_path.iterdir()) == [] and list(tmp_path.parent.glob(f"{tmp_path.name}.tmp*")) == []


def test_16_bit_checkpoints_are_half_the_size_and_load_as_float32(tmp_path, tokenizer):
    model = tiny_model()
    save_checkpoint(tmp_path / "full.pth", model, tokenizer)
    save_checkpoint(tmp_path / "half.pth", model, tokenizer, weights_dtype=torch.float16)
    assert (tmp_path / "half.pth").stat().st_size < 0.6 * (tmp_path / "full.pth").stat().st_size
    loaded, _, _ = load_checkpoint(tmp_path / "half.pth")
    assert all(p.dtype == torch.float32 for p in loaded.parameters())
    ids = random_ids()
    torch.testing.assert_close(loaded(ids).logits, model(ids).logits, atol=2e-3, rtol=0)


def test_optimizer_state_goes_into_a_checkpoint_and_comes_back(tmp_path, tokenizer):
    model = tiny_model().train()
    optimizer = torch.optim.AdamW(model.parameters())
    model(random_ids(), targets=random_ids(seed=6)).loss.backward()
    optimizer.step()
    save_checkpoint(tmp_path / "last.pth", model, tokenizer, optimizer=optimizer.state_dict(),
                    rng=torch.get_rng_state())
    _, _, metadata = load_checkpoint(tmp_path / "last.pth")
    restored = torch.optim.AdamW(model.parameters())
    restored.load_state_dict(metadata["optimizer"])
    assert torch.equal(restored.state_dict()["state"][0]["exp_avg"], optimizer.state_dict()["state"][0]["exp_avg"])


def test_metadata_that_cannot_be_loaded_safely_is_refused_before_writing(tmp_path, tokenizer):
    with pytest.raises(TypeError, match=r"metadata\.note: a object cannot go into a checkpoint"):
        save_checkpoint(tmp_path / "x.pth", tiny_model(), tokenizer, note=object())
    assert not list(tmp_path.iterdir())


class Payload:  # any Python object other than tensors and plain values
    pass


def test_a_checkpoint_holding_pickled_objects_is_refused(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"format": "tinystories-transformer/checkpoint", "payload": Payload()}, path)
    with pytest.raises(CheckpointError, match="refused: it holds Python objects"):
        load_checkpoint(path)


def test_bad_checkpoint_files_get_one_clear_line(tmp_path, tokenizer):
    model = tiny_model()
    good = tmp_path / "good.pth"
    save_checkpoint(good, model, tokenizer)
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    foreign = tmp_path / "foreign.pth"
    torch.save(model.state_dict(), foreign)
    text = tmp_path / "notes.pth"
    text.write_text("hello")
    cases = {
        tmp_path / "missing.pth": "no such file",
        tmp_path: "is a folder",
        truncated: "not a readable checkpoint",
        text: "not a readable checkpoint",
        foreign: "not a checkpoint of this project",
    }
    for path, message in cases.items():
        with pytest.raises(CheckpointError, match=message) as err:
            load_checkpoint(path)
        assert str(path) in str(err.value) and "\n" not in str(err.value)


def edited_checkpoint(tmp_path, tokenizer, edit):
    path = tmp_path / "edited.pth"
    save_checkpoint(path, tiny_model(), tokenizer)
    payload = torch.load(path, weights_only=True)
    edit(payload)
    torch.save(payload, path)
    return path


def test_mismatched_checkpoints_are_named(tmp_path, tokenizer):
    small_tokenizer = tokenizer_of_size(260)
    cases = [
        (lambda p: p["config"].update(n_embd=32), "bad model config: unknown config key.*n_embd"),
        (lambda p: p.update(tokenizer=small_tokenizer.to_json()), "tokenizer has 260 tokens but the model's vocab_size is 300"),
        (lambda p: p["model"].pop("final_norm.weight"), "weights do not fit the config"),
        (lambda p: p.update(tokenizer="{broken"), "its tokenizer.*not valid JSON"),
        (lambda p: p.update(version=7), "checkpoint version 7"),
    ]
    for edit, message in cases:
        with pytest.raises(CheckpointError, match=message):
            load_checkpoint(edited_checkpoint(tmp_path, tokenizer, edit))


def test_checkpoint_of_a_wrapped_model_is_the_inner_model(tmp_path, tokenizer):
    class Wrapper(torch.nn.Module):  # DistributedDataParallel keeps the model as .module
        def __init__(self, module):
            super().__init__()
            self.module = module

    model = tiny_model()
    save_checkpoint(tmp_path / "wrapped.pth", Wrapper(model), tokenizer)
    loaded, _, _ = load_checkpoint(tmp_path / "wrapped.pth")
    assert loaded.state_dict().keys() == model.state_dict().keys()


# ------------------------------------------------------------------------- devices

def test_devices_are_picked_or_refused_clearly():
    assert pick_device("cpu") == torch.device("cpu")
    assert pick_device("auto").type in ("cpu", "cuda", "mps")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available here"):
            pick_device("cuda")
    with pytest.raises(ValueError, match="choose auto, cpu, cuda or mps"):
        pick_device("tpu")


def test_cpu_autocast_dtype_follows_the_processor():
    assert autocast_dtype("cpu") == (torch.bfloat16 if cpu_has_native_bf16() else None)
