"""The four notebooks run top to bottom (nbclient, an ipykernel kernel) on tiny artifacts."""


import nbformat
import pytest

from conftest import REPO
from helpers import story_tokenizer, write_story_corpus
from test_train_tinystories_model import TINY_MODEL
from train_tinystories_model import main as pretrain
from transformer_model import TransformerConfig, TransformerLM, save_checkpoint

nbclient = pytest.importorskip("nbclient")


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    """Data, a tokenizer, a briefly trained model with a history, and a learned-position model."""
    folder = write_story_corpus(tmp_path_factory.mktemp("notebook_artifacts"), train=200, valid=40)
    tokenizer = story_tokenizer(400, stories=100)
    tokenizer.save(folder / "tok.json")
    pretrain(["--dataset", str(folder), "--tokenizer_path", str(folder / "tok.json"), "--output_dir", str(folder / "run"),
              "--max_steps", "20", "--eval_interval", "10", "--batch_size", "8", "--block_size", "64",
              "--sample_tokens", "4", "--num_workers", "1", *TINY_MODEL])
    learned = TransformerLM(TransformerConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=1,
                                              num_attention_heads=4, intermediate_size=64, max_position_embeddings=64,
                                              window_size=None, position_embedding="learned"))
    save_checkpoint(folder / "learned.pth", learned, tokenizer)
    return folder


def parameters(artifacts):
    data, model = str(artifacts), str(artifacts / "run" / "best_model.pth")
    return {
        "data_exploration": dict(DATA=data, CHECKPOINT=model, CONTEXT_LENGTHS=(32, 64)),
        "bpe_exploration": dict(DATA=data, CHECKPOINT=model, SAMPLE_STORIES=100, VOCAB_SIZES=(280, 320, 400)),
        "pretrained_model_analysis": dict(CHECKPOINT=model, LEARNED_CHECKPOINT=str(artifacts / "learned.pth"),
                                          TENSORBOARD_DIR=str(artifacts / "run" / "runs"), DATA=data, MAX_NEW_TOKENS=8),
        "chat_model_analysis": dict(BASE=model, CHAT=model, DATA=data, VALIDATION_CONVERSATIONS=8, MAX_NEW_TOKENS=8,
                                    REQUESTS_PER_KIND=2, TEMPERATURES=(0.7, 1.0)),
    }


@pytest.mark.parametrize("name", ["data_exploration", "bpe_exploration", "pretrained_model_analysis",
                                  "chat_model_analysis"])
def test_notebook_runs_top_to_bottom(artifacts, name):
    notebook = nbformat.read(REPO / "notebooks" / f"{name}.ipynb", as_version=4)
    index = next(i for i, cell in enumerate(notebook.cells) if "parameters" in cell.metadata.get("tags", []))
    overrides = "\n".join(f"{key} = {value!r}" for key, value in parameters(artifacts)[name].items())
    notebook.cells.insert(index + 1, nbformat.v4.new_code_cell(overrides))
    client = nbclient.NotebookClient(notebook, timeout=120, kernel_name="python3",
                                     resources={"metadata": {"path": str(REPO / "notebooks")}})
    client.execute()
    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    assert any(o.output_type == "display_data" and "image/png" in o.data for o in outputs)


@pytest.mark.parametrize("name", ["data_exploration", "bpe_exploration", "pretrained_model_analysis",
                                  "chat_model_analysis"])
def test_notebook_defaults_are_the_released_models_a_fresh_clone_has(name):
    notebook = nbformat.read(REPO / "notebooks" / f"{name}.ipynb", as_version=4)
    cell = next(cell for cell in notebook.cells if "parameters" in cell.metadata.get("tags", []))
    defaults: dict = {}
    exec(cell.source, defaults)
    checkpoints = [value for value in defaults.values() if isinstance(value, str) and value.endswith(".pth")]
    assert checkpoints
    for path in checkpoints:
        assert path.startswith("pretrained/") and (REPO / path).is_file(), path
