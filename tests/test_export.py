"""Exports: every position scheme as a Hugging Face folder that transformers runs with our
logits, tokens, tokenizer and chat template; the folder read back by our own loader; GGUF
files read back by the gguf package; refusals that name the field and leave nothing behind."""

import math

import pytest
import torch

from common import temporary_prefix
from conftest import REPO, VALID_FILE
from decoding import beam_search, generate
from hf_interop import ExportError, save_hf_folder, to_hf_model, tokenizer_from_hf_json
from test_bad_inputs import assert_one_error_line, run_cli
from test_bpe_tokenizer import TRICKY_TEXTS
from test_transformer_model import VOCAB, random_ids, switched_model, tiny_model, tokenizer_of_size
from transformer_model import CheckpointError, load_checkpoint, save_checkpoint

transformers = pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")

# One exportable configuration per position scheme, and the variants each architecture must carry.
EXPORTABLE = {
    "learned": dict(position_embedding="learned", activation="gelu_tanh"),
    "sinusoidal": dict(position_embedding="sinusoidal"),
    "no positions": dict(position_embedding="none", activation="relu2"),
    "learned, no biases, untied": dict(position_embedding="learned", bias=False, tie_word_embeddings=False),
    "rope": dict(position_embedding="rope"),
    "rope, window": dict(position_embedding="rope", window_size=8),
    "rope, window, qk_norm": dict(position_embedding="rope", window_size=8, qk_norm=True, activation="gelu_tanh"),
    "rope, no biases, untied": dict(position_embedding="rope", bias=False, tie_word_embeddings=False),
    "alibi (MPT's shape)": dict(position_embedding="alibi", bias=False, intermediate_size=128),
}
ARCHITECTURES = {"learned": "gpt2", "sinusoidal": "gpt2", "no positions": "gpt2", "learned, no biases, untied": "gpt2",
                 "rope": "starcoder2", "rope, window": "starcoder2", "rope, window, qk_norm": "starcoder2_qk_norm",
                 "rope, no biases, untied": "starcoder2", "alibi (MPT's shape)": "mpt"}
EOS = VOCAB - 1


@pytest.fixture(scope="module")
def tokenizer():
    return tokenizer_of_size(VOCAB)


def exported(tmp_path, tokenizer, **config):
    """A tiny model with every weight moved off its initial value, exported; (ours, folder)."""
    model = switched_model(**config)
    assert save_hf_folder(model, tokenizer, tmp_path / "export") in ARCHITECTURES.values()
    return model, tmp_path / "export"


def hf_from(folder):
    return transformers.AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()


@pytest.mark.parametrize("name", list(EXPORTABLE))
def test_transformers_gives_our_logits_from_the_exported_folder(name, tmp_path, tokenizer):
    ours, folder = exported(tmp_path, tokenizer, **EXPORTABLE[name])
    hf = hf_from(folder)
    ids = random_ids(2, 64)  # the whole context: eight times the window where there is one
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, ours(ids).logits, atol=1e-4, rtol=0)
    assert hf.config.model_type == ARCHITECTURES[name]


@pytest.mark.parametrize("name", list(EXPORTABLE))
def test_an_exported_folder_loads_back_as_the_same_model(name, tmp_path, tokenizer):
    ours, folder = exported(tmp_path, tokenizer, **EXPORTABLE[name])
    model, loaded_tokenizer, _ = load_checkpoint(folder, device="cpu")
    assert model.config == ours.config
    for (key, expected), (_, actual) in zip(ours.state_dict().items(), model.state_dict().items(), strict=True):
        torch.testing.assert_close(actual, expected, atol=1e-6, rtol=1e-6, msg=key)  # sinusoidal: one division
    assert loaded_tokenizer.fingerprint() == tokenizer.fingerprint()


@pytest.mark.parametrize("name", ["learned", "rope, window, qk_norm"])
def test_greedy_and_beam_tokens_equal_hugging_face_generate_on_the_folder(name, tmp_path, tokenizer):
    ours, folder = exported(tmp_path, tokenizer, **EXPORTABLE[name])
    hf, prompt = hf_from(folder), [5, 17, 42, 99, 3]
    settings = dict(do_sample=False, max_new_tokens=30, eos_token_id=EOS, pad_token_id=EOS)  # past the window of 8
    expected = hf.generate(torch.tensor([prompt]), **settings)[0, len(prompt):].tolist()
    (tokens,) = generate(ours, prompt, 30, do_sample=False, eos_token_id=EOS)
    assert tokens == expected[: len(tokens)] and (len(tokens) == 30 or tokens[-1] == EOS)
    out = hf.generate(torch.tensor([prompt]), num_beams=3, num_return_sequences=3, output_scores=True,
                      return_dict_in_generate=True, **settings | {"max_new_tokens": 12})
    results = beam_search(ours, prompt, num_beams=3, max_new_tokens=12, num_return_sequences=3, eos_token_id=EOS)
    for (tokens, score), sequence, hf_score in zip(results, out.sequences, out.sequences_scores, strict=True):
        assert tokens == sequence[len(prompt):].tolist()[: len(tokens)]
        assert math.isclose(score, hf_score.item(), abs_tol=1e-4)


@pytest.fixture(scope="module")
def released_tokenizer():
    return load_checkpoint(REPO / "pretrained" / "tinystories_chat.pth", device="cpu")[1]


def test_autotokenizer_on_the_folder_gives_our_ids_and_our_chat_template(tmp_path, released_tokenizer):
    save_hf_folder(tiny_model(vocab_size=released_tokenizer.vocab_size, position_embedding="rope"), released_tokenizer,
                   tmp_path / "export")
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path / "export")
    texts = [t for t in TRICKY_TEXTS if "<" not in t] + ["Once upon a time, Tom's dog ran   fast!\n\nThe end."]
    for text in texts:
        assert hf.encode(text) == released_tokenizer.encode(text), text
        assert hf.decode(released_tokenizer.encode(text)) == text
    conversation = [{"role": "system", "content": "Be kind."},
                    {"role": "user", "content": "A story about a cat, please."},
                    {"role": "assistant", "content": "Once upon a time, a cat sat."},
                    {"role": "user", "content": "Again, with a dog named Max!"}]
    for add_generation_prompt in (False, True):
        ours = released_tokenizer.apply_chat_template(conversation, add_generation_prompt=add_generation_prompt)
        theirs = hf.apply_chat_template(conversation, add_generation_prompt=add_generation_prompt, tokenize=True)
        assert list(theirs["input_ids"] if hasattr(theirs, "keys") else theirs) == ours
    assert hf.eos_token == "<|endoftext|>"
    read_back = tokenizer_from_hf_json(tmp_path / "export" / "tokenizer.json")
    assert read_back.fingerprint() == released_tokenizer.fingerprint()


@pytest.mark.parametrize("config, words", [
    (dict(norm_position="post"), "norm_position='post'"),
    (dict(position_embedding="learned", skip_weights=True), "skip_weights=True"),
    (dict(position_embedding="learned", window_size=8), "window_size=8"),
    (dict(position_embedding="learned", qk_norm=True), "qk_norm=True with position_embedding='learned'"),
    (dict(position_embedding="alibi"), "bias=True with position_embedding='alibi'"),
])
def test_a_model_with_no_exact_twin_is_refused_by_field_and_nothing_is_written(config, words, tmp_path, tokenizer):
    with pytest.raises(ExportError, match=words.replace("(", r"\(")):
        save_hf_folder(tiny_model(**config), tokenizer, tmp_path / "export")
    assert list(tmp_path.iterdir()) == []


def test_a_folder_changed_outside_the_project_or_damaged_is_refused_in_one_line(tmp_path, tokenizer):
    from safetensors.torch import load_file, save_file

    _, folder = exported(tmp_path, tokenizer, position_embedding="sinusoidal")
    state = load_file(folder / "model.safetensors")
    state["transformer.wpe.weight"][3, 0] += 1.0  # the fixed position table, trained elsewhere
    save_file(state, folder / "model.safetensors")
    with pytest.raises(CheckpointError, match="transformer.wpe.weight is not what this project's model exports"):
        load_checkpoint(folder)
    (folder / "model.safetensors").write_bytes(b"not safetensors at all")
    with pytest.raises(CheckpointError, match="model.safetensors: does not hold this model's weights"):
        load_checkpoint(folder)
    (folder / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="not a model folder written by export_model.py"):
        load_checkpoint(folder)


def test_replacing_an_export_keeps_nothing_of_the_old_one_and_no_temporary_folder(tmp_path, tokenizer):
    first, folder = exported(tmp_path, tokenizer, position_embedding="rope")
    with pytest.raises(OSError, match="already exists"):
        save_hf_folder(first, tokenizer, folder)
    second = switched_model(position_embedding="learned")
    save_hf_folder(second, tokenizer, folder, overwrite=True)
    assert load_checkpoint(folder)[0].config == second.config
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]


# ---------------------------------------------------------------------------- GGUF

def test_gguf_file_holds_the_starcoder2_tensors_and_metadata(tmp_path, released_tokenizer):
    from gguf_export import save_gguf

    model = switched_model(vocab_size=released_tokenizer.vocab_size, position_embedding="rope", window_size=8,
                           activation="gelu_tanh")
    assert save_gguf(model, released_tokenizer, tmp_path / "m.gguf", dtype=torch.float16) == "starcoder2"
    reader = gguf.GGUFReader(tmp_path / "m.gguf")
    fields = {name: field.contents() for name, field in reader.fields.items()}
    assert fields["general.architecture"] == "starcoder2"
    assert fields["starcoder2.context_length"] == 8  # cut to the window: llama.cpp's StarCoder2 has none
    assert fields["starcoder2.block_count"] == 2 and fields["starcoder2.attention.head_count"] == 4
    assert fields["tokenizer.ggml.model"] == "gpt2" and fields["tokenizer.ggml.pre"] == "gpt-2"
    assert len(fields["tokenizer.ggml.tokens"]) == released_tokenizer.vocab_size
    assert fields["tokenizer.ggml.eos_token_id"] == released_tokenizer.special_tokens["<|endoftext|>"]
    assert fields["tokenizer.ggml.tokens"][released_tokenizer.special_tokens["<user>"]] == "<user>"
    tensors = {t.name: t for t in reader.tensors}
    q = tensors["blk.0.attn_q.weight"]
    assert q.tensor_type == gguf.GGMLQuantizationType.F16 and list(q.shape) == [32, 32]
    expected_q = model.blocks[0].attention.qkv.weight[:32].detach().half().numpy()
    assert (q.data.reshape(32, 32) == expected_q).all()
    assert tensors["blk.1.ffn_up.bias"].tensor_type == gguf.GGMLQuantizationType.F32
    assert len(tensors) == 1 + 2 * 16 + 2  # embedding, 16 per block, the final norm (the head is tied)


def test_gguf_file_of_a_gpt2_shaped_model_stores_linear_weights_as_out_by_in(tmp_path, released_tokenizer):
    from gguf_export import save_gguf

    model = switched_model(vocab_size=released_tokenizer.vocab_size, position_embedding="learned",
                           activation="gelu_tanh")
    assert save_gguf(model, released_tokenizer, tmp_path / "m.gguf") == "gpt2"
    tensors = {t.name: t for t in gguf.GGUFReader(tmp_path / "m.gguf").tensors}
    fc1 = model.blocks[0].feed_forward.fc1.weight.detach().numpy()  # (64, 32)
    assert (tensors["blk.0.ffn_up.weight"].data.reshape(fc1.shape) == fc1).all()
    assert "position_embd.weight" in tensors


LLAMA_CPP_LAYER_TENSORS = {  # what llama.cpp's loaders require of every block
    "starcoder2": ["attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm", "ffn_up", "ffn_down"],
    "gpt2": ["attn_norm", "attn_qkv", "attn_output", "ffn_norm", "ffn_up", "ffn_down"],
}


@pytest.mark.parametrize("positions", ["rope", "learned"])
def test_gguf_of_a_model_without_biases_or_tied_head_has_every_tensor_llama_cpp_requires(positions, tmp_path,
                                                                                         released_tokenizer):
    from gguf_export import save_gguf

    model = switched_model(vocab_size=released_tokenizer.vocab_size, position_embedding=positions, bias=False,
                           tie_word_embeddings=False, activation="gelu_tanh")
    architecture = save_gguf(model, released_tokenizer, tmp_path / "m.gguf")
    tensors = {t.name: t for t in gguf.GGUFReader(tmp_path / "m.gguf").tensors}
    expected = {"token_embd.weight", "output_norm.weight", "output_norm.bias", "output.weight"}
    expected |= {f"blk.{i}.{name}.{kind}" for i in range(2) for name in LLAMA_CPP_LAYER_TENSORS[architecture]
                 for kind in ("weight", "bias")}
    expected |= {"position_embd.weight"} if positions == "learned" else set()
    assert set(tensors) == expected
    assert not tensors["blk.0.ffn_up.bias"].data.any()  # the biases this model lacks are zeros


@pytest.mark.parametrize("config, words", [
    (dict(position_embedding="rope", qk_norm=True, activation="gelu_tanh"), "qk_norm=True"),
    (dict(position_embedding="rope"), "--allow_gelu_approx"),
    (dict(position_embedding="rope", activation="relu2"), "activation='relu2'"),
    (dict(position_embedding="alibi", bias=False, intermediate_size=128), "position_embedding='alibi'"),
])
def test_gguf_refuses_what_llama_cpp_would_compute_differently(config, words, tmp_path, tokenizer):
    from gguf_export import save_gguf

    with pytest.raises(ExportError, match=words):
        save_gguf(tiny_model(**config), tokenizer, tmp_path / "m.gguf")
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------ the script

@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory, tokenizer):
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pth"
    save_checkpoint(path, switched_model(position_embedding="rope", window_size=8, qk_norm=True), tokenizer,
                    kind="pretraining", step=3)
    return path


def test_export_script_writes_a_folder_that_every_script_takes(tmp_path, tiny_checkpoint):
    result = run_cli("export_model.py", "--model_path", str(tiny_checkpoint), "--output", str(tmp_path / "hf"))
    assert result.returncode == 0, result.stderr
    assert "starcoder2_qk_norm" in result.stdout and "largest logit difference" in result.stdout
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(temporary_prefix("hf"))]
    story = run_cli("generate_tinystories_text.py", "--model_path", str(tmp_path / "hf"), "--prompt", "ab",
                    "--max_new_tokens", "5", "--seed", "0")
    assert story.returncode == 0, story.stderr


def test_export_script_refuses_an_existing_output_and_a_refused_model_in_one_line(tmp_path, tiny_checkpoint):
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "notes.txt").write_text("mine")
    assert_one_error_line(run_cli("export_model.py", "--model_path", str(tiny_checkpoint), "--output",
                                  str(tmp_path / "hf")), 2, "--overwrite")
    assert_one_error_line(run_cli("export_model.py", "--model_path", str(tiny_checkpoint), "--output",
                                  str(tmp_path / "hf"), "--overwrite"), 2, "never replaced")
    assert (tmp_path / "hf" / "notes.txt").read_text() == "mine"
    assert_one_error_line(run_cli("export_model.py", "--model_path", str(tiny_checkpoint), "--format", "gguf",
                                  "--output", str(tmp_path / "m.gguf")), 1, "qk_norm=True")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]


# ------------------------------------------------------------------- the released models

@pytest.mark.parametrize("name", ["tinystories_base", "tinystories_chat"])
def test_released_models_export_with_our_logits_and_our_greedy_stories(name, tmp_path):
    ours, tokenizer, metadata = load_checkpoint(REPO / "pretrained" / f"{name}.pth", device="cpu")
    save_hf_folder(ours, tokenizer, tmp_path / "export", metadata)
    hf = hf_from(tmp_path / "export")
    text = VALID_FILE.read_text(encoding="utf-8")[:4000] if VALID_FILE.exists() else " ".join(TRICKY_TEXTS[3:8]) * 40
    ids = torch.tensor([tokenizer.encode(text, allowed_special="none")[:512]])  # the whole context, twice the window
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, ours(ids).logits, atol=1e-4, rtol=0)
    prompt = tokenizer.encode("Once upon a time")
    eos = tokenizer.special_tokens["<|endoftext|>"]
    expected = hf.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=100, eos_token_id=eos,
                           pad_token_id=eos)[0, len(prompt):].tolist()
    (tokens,) = generate(ours, prompt, 100, do_sample=False, eos_token_id=eos)
    assert tokens == expected[: len(tokens)]
    assert (tmp_path / "export" / "README.md").read_text().startswith("# A tinystories-transformer model")


def test_to_hf_model_builds_the_same_model_in_memory():
    model = switched_model(position_embedding="rope", window_size=8, qk_norm=True)
    ids = random_ids(2, 40)
    with torch.no_grad():
        torch.testing.assert_close(to_hf_model(model)(ids).logits, model(ids).logits, atol=1e-4, rtol=0)
