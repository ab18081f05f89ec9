"""compare_revisions reads the tokens/s cells of a benchmark's Markdown tables."""

from compare_revisions import speed_cells

OUTPUT = """machine: a CPU
| case | ours tokens/s | ours / HF |
| --- | ---: | ---: |
| batch 1, greedy | 1,046 | 4.39x |
| batch 1, no KV cache | 67 | |

| model | precision | batch x seq | tokens/s ours | tokens/s HF GPT-2 | MFU ours |
| --- | --- | --- | ---: | ---: | ---: |
| eager | float32 | 8 x 256 | 5,136 | 3,828 | 56% |
| eager | bf16 | 8 x 256 | 3,026 | 2,572 | 66% |
"""


def test_every_tokens_per_second_cell_is_read_under_its_row_and_column():
    assert speed_cells(OUTPUT) == {
        ("batch 1, greedy", "ours tokens/s"): 1046.0,
        ("batch 1, no KV cache", "ours tokens/s"): 67.0,
        ("eager, float32, 8 x 256", "tokens/s ours"): 5136.0,
        ("eager, float32, 8 x 256", "tokens/s HF GPT-2"): 3828.0,
        ("eager, bf16, 8 x 256", "tokens/s ours"): 3026.0,
        ("eager, bf16, 8 x 256", "tokens/s HF GPT-2"): 2572.0,
    }
