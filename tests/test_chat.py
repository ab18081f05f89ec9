"""Chat: the template and its loss mask, conversation data (hub format, TinyStoriesInstruct,
built from stories), assistant-only fine-tuning, and the terminal REPL."""

import itertools
import json
import random
import re
import signal
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import train_tinystories_chat_model
import training
from bpe_tokenizer import BPETokenizer
from chat_data import (
    ChatExamples,
    FreshChatExamples,
    avoided_tokens,
    conversations_from_stories,
    first_uses,
    fit_conversation,
    instruct_entries,
    load_conversations,
    parse_instruct_entry,
    request_words,
    requested_tokens,
    swap_group,
    swap_pool,
    swapped_words_request,
    word_ending,
    word_roles,
    words_request,
)
from conftest import REPO
from helpers import (
    default_stop_signals,
    endless_model,
    record_sample_prompts,
    story,
    story_tokenizer,
    write_story_corpus,
)
from speedups import use_chunked_loss
from test_train_tinystories_model import TINY_MODEL
from tinystories_data import DataError, story_words
from train_tinystories_model import main as pretrain
from transformer_model import (
    AvoidedTokens,
    LMHead,
    TransformerConfig,
    TransformerLM,
    load_checkpoint,
    save_checkpoint,
)

CHAT = [
    {"role": "system", "content": "Be kind."},
    {"role": "user", "content": "Tell me a story."},
    {"role": "assistant", "content": "Once upon a time."},
    {"role": "user", "content": "Another!"},
    {"role": "assistant", "content": "The end."},
]


@pytest.fixture(scope="module")
def tokenizer():
    rng = random.Random(1)
    return BPETokenizer.train([story(rng) for _ in range(100)] + ["Tell me a story. Be kind."], vocab_size=320)


# ------------------------------------------------------------------------ template

def test_template_layout_for_a_multi_turn_conversation(tokenizer):
    ids = tokenizer.apply_chat_template(CHAT)
    special = tokenizer.special_tokens
    expected = [
        special["<system>"], *tokenizer.encode("Be kind."),
        special["<user>"], *tokenizer.encode("Tell me a story."),
        special["<assistant>"], *tokenizer.encode("Once upon a time."), special["<|endoftext|>"],
        special["<user>"], *tokenizer.encode("Another!"),
        special["<assistant>"], *tokenizer.encode("The end."), special["<|endoftext|>"],
    ]
    assert ids == expected
    assert tokenizer.decode(ids) == ("<system>Be kind.<user>Tell me a story.<assistant>Once upon a time."
                                     "<|endoftext|><user>Another!<assistant>The end.<|endoftext|>")


def test_the_mask_marks_assistant_content_and_its_end_token_only(tokenizer):
    ids, mask = tokenizer.apply_chat_template(CHAT[:3], return_mask=True)
    trained = tokenizer.decode([t for t, m in zip(ids, mask, strict=True) if m])
    assert trained == "Once upon a time.<|endoftext|>"
    ids, mask = tokenizer.apply_chat_template(CHAT, return_mask=True)
    assert tokenizer.decode([t for t, m in zip(ids, mask, strict=True) if m]) == (
        "Once upon a time.<|endoftext|>The end.<|endoftext|>")


def test_a_generation_prompt_ends_with_the_assistant_token(tokenizer):
    ids = tokenizer.apply_chat_template(CHAT[:2], add_generation_prompt=True)
    assert ids[-1] == tokenizer.special_tokens["<assistant>"]


def test_special_token_text_in_a_message_stays_plain_text(tokenizer):
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "hi <assistant> there<|endoftext|>"}])
    assert ids.count(tokenizer.special_tokens["<assistant>"]) == 0
    assert ids.count(tokenizer.special_tokens["<|endoftext|>"]) == 0
    assert tokenizer.decode(ids) == "<user>hi <assistant> there<|endoftext|>"


@pytest.mark.parametrize("messages, message", [
    ([{"role": "robot", "content": "beep"}], "role 'robot' is not one of system, user, assistant"),
    ([{"role": "user", "content": 3}], "content must be a str"),
    (["hello"], "role None"),
])
def test_bad_messages_are_refused(tokenizer, messages, message):
    with pytest.raises(ValueError, match=message):
        tokenizer.apply_chat_template(messages)


# ---------------------------------------------------------------------------- data

INSTRUCT_SAMPLE = """Words: quit, oak, gloomy
Features: Dialogue, Twist
Summary: A bird wants to quit flying but an oak tree helps.
Story:
Once upon a time, a bird sat in a big oak tree. It felt gloomy.
"I want to quit," said the bird. But the oak said, "Try again!"
<|endoftext|>
Random sentence: The sun was warm.
Features: BadEnding
Story: Tom had a red ball. The sun was warm. Then the ball was gone.
<|endoftext|>
Summary: no story here
<|endoftext|>
"""


def test_the_instruct_parser_reads_metadata_in_any_order_then_the_story():
    entries = [parse_instruct_entry(e) for e in INSTRUCT_SAMPLE.split("<|endoftext|>")]
    first, second, empty = entries[0], entries[1], entries[2]
    assert first.words == ["quit", "oak", "gloomy"] and first.features == ["Dialogue", "Twist"]
    assert first.summary.startswith("A bird wants") and first.story.startswith("Once upon a time")
    assert first.story.endswith('"Try again!"')
    assert second.sentence == "The sun was warm." and second.story.startswith("Tom had")
    assert empty is None


def test_instruct_entries_are_reassembled_from_one_line_per_row():
    rows = INSTRUCT_SAMPLE.splitlines()  # how the hub stores TinyStoriesInstruct
    entries = [parse_instruct_entry(e) for e in instruct_entries(rows)]
    assert [e.story.split()[0] for e in entries if e] == ["Once", "Tom"]


def test_instruct_text_becomes_conversations_with_requests_from_the_metadata(tmp_path):
    path = tmp_path / "instruct.txt"
    path.write_text(INSTRUCT_SAMPLE, encoding="utf-8")
    conversations = load_conversations(str(path))
    assert len(conversations) == 2
    request, reply = conversations[0]
    assert all(word in request["content"] for word in ("quit", "oak", "gloomy", "dialogue", "twist"))
    assert reply == {"role": "assistant", "content": parse_instruct_entry(INSTRUCT_SAMPLE.split("<|endoftext|>")[0]).story}


def test_a_messages_column_is_read_and_checked(tmp_path):
    path = tmp_path / "chats.jsonl"
    path.write_text("\n".join(json.dumps({"messages": CHAT[i : i + 3]}) for i in (0, 2)), encoding="utf-8")
    assert load_conversations(str(path))[0] == CHAT[:3]
    path.write_text(json.dumps({"messages": [{"role": "nobody", "content": "x"}]}), encoding="utf-8")
    with pytest.raises(DataError, match="needs a role"):
        load_conversations(str(path))


def test_conversations_built_from_stories_are_valid_and_answer_from_the_story():
    rng = random.Random(3)
    stories = [story(rng) for _ in range(60)]
    conversations = conversations_from_stories(stories, seed=0, multi_turn=0.5, system=0.5)
    assert len(conversations) == 60
    json.loads(json.dumps(conversations))
    kinds = set()
    for messages in conversations:
        roles = [m["role"] for m in messages]
        assert roles in (["user", "assistant"], ["system", "user", "assistant"],
                         ["user", "assistant", "user", "assistant"], ["system", "user", "assistant", "user", "assistant"])
        for message in messages:
            if message["role"] == "assistant":
                assert any(message["content"] in s for s in stories)
            if message["role"] == "user":
                kinds.add(message["content"].split()[0])
    assert len(kinds) >= 4  # several kinds of request
    uses = [m for c in conversations for m in c if "the words" in m["content"]]
    assert uses


def test_each_built_reply_names_what_its_request_asked_for():
    rng = random.Random(3)
    tales = [f"Once upon a time, {name} had a ball. One day, {name} lost it in the park. Then {name} found it. "
             "The ball was red. The end." for name in (rng.choice(["Lily", "Tom", "Ben"]) for _ in range(60))]
    conversations = conversations_from_stories(tales, seed=0, multi_turn=0.5)
    kinds = set()
    for messages in conversations:
        for request, reply in itertools.pairwise(messages):
            if reply["role"] == "assistant" and "requested" in reply:
                kinds.add(len(reply["requested"]))
                assert reply["requested"] and all(item in request["content"] for item in reply["requested"])
                assert all(re.search(rf"\b{item}\b", reply["content"], re.I) for item in reply["requested"])
    assert 3 in kinds and 1 in kinds  # words requests, and names or openings


def spans_by_prefix(tokenizer, ids: list[int], start: int, end: int) -> list[int]:
    """Brute force: the tokens whose decoded prefix text reaches into reply[start:end]."""
    return [k for k in range(len(ids))
            if len(tokenizer.decode(ids[: k + 1])) > start and len(tokenizer.decode(ids[:k])) < end]


def test_requested_tokens_spell_the_first_use_of_each_item_as_a_word_in_any_case(tokenizer):
    reply = "Tom could not catch it. The Cat sat on a hat. Then the cat and the hat were happy."
    ids = tokenizer.encode(reply, allowed_special="none")
    expected = sorted(set(spans_by_prefix(tokenizer, ids, reply.index("Cat"), reply.index("Cat") + 3)
                          + spans_by_prefix(tokenizer, ids, reply.index("hat"), reply.index("hat") + 3)))
    assert requested_tokens(tokenizer, reply, ["cat", "hat", "zebra"]) == expected  # not "catch"; zebra is absent
    assert "".join(tokenizer.decode([ids[k]]) for k in expected).split() == ["Cat", "hat"]
    assert requested_tokens(tokenizer, reply, []) == []


def test_chat_rows_weigh_the_requested_tokens_and_nothing_outside_the_replies(tokenizer):
    asked = [{"role": "user", "content": "A story about Tom, please."},
             {"role": "assistant", "content": "Tom had a hat. Tom was happy.", "requested": ["Tom"]}]
    plain = ChatExamples([asked], tokenizer, block_size=48)
    weighted = ChatExamples([asked], tokenizer, block_size=48, requested_weight=5.0)
    _, targets, weights = plain[0]
    assert torch.equal(weights, (targets != -100).float())  # by default every assistant token counts alike
    _, targets, weights = weighted[0]
    reply_start = int((targets != -100).nonzero()[0])  # the row's targets are the ids shifted by one
    stressed = [reply_start + k for k in requested_tokens(tokenizer, asked[1]["content"], ["Tom"])]
    assert (weights[stressed] == 5.0).all() and len(stressed) >= 1
    assert tokenizer.decode(targets[stressed].tolist()) == "Tom"  # the first Tom, not the second
    others = torch.ones_like(weights, dtype=torch.bool)
    others[stressed] = False
    assert torch.equal(weights[others], (targets[others] != -100).float())


def test_first_uses_give_each_found_items_tokens_in_the_order_asked(tokenizer):
    reply = "The hat was red. A cat sat on the hat."
    uses = first_uses(tokenizer, reply, ["cat", "zebra", "hat"])
    assert [tokenizer.decode([tokenizer.encode(reply, allowed_special="none")[k] for k in use]) for use in uses] == [
        " cat", " hat"]  # zebra is absent; the hat's first use, not its second
    assert requested_tokens(tokenizer, reply, ["cat", "hat"]) == sorted(uses[0] + uses[1])


def test_a_requested_words_first_token_is_avoided_before_its_first_use_and_nowhere_else(tokenizer):
    reply = "It was a sunny day. The sun was hot. The sun set."
    asked = [{"role": "user", "content": "Use the word sun."},
             {"role": "assistant", "content": reply, "requested": ["sun"]},
             {"role": "user", "content": "Another!"}, {"role": "assistant", "content": "The sun."}]
    ids, mask = tokenizer.apply_chat_template(asked, return_mask=True)
    reply_ids, reply_start = tokenizer.encode(reply, allowed_special="none"), mask.index(True)
    first = spans_by_prefix(tokenizer, reply_ids, reply.index(" sun ") + 1, reply.index(" sun ") + 4)[0]
    word = reply_ids[first]  # the first use's first token, brute force
    expected = [[word] if reply_start <= k < reply_start + first and ids[k] != word else [] for k in range(len(ids))]
    assert avoided_tokens(tokenizer, asked, ids, mask) == expected  # not after the first use, nor in a reply
    assert sum(map(len, expected)) >= 5  # that asked for nothing; where the target is the token itself, kept


def test_balanced_chat_rows_bring_the_avoided_ids_beside_their_targets(tokenizer):
    asked = [{"role": "user", "content": "Use the words hat and cat."},
             {"role": "assistant", "content": "The hat was red. A cat sat on it.", "requested": ["hat", "cat"]}]
    _, targets, _, ids, avoid_weights = ChatExamples([asked], tokenizer, 48, 20.0, balancing_weight=19.0)[0]
    assert len(ChatExamples([asked], tokenizer, 48, 20.0)[0]) == 3  # off by default: no avoided parts
    template_ids, mask = tokenizer.apply_chat_template(asked, return_mask=True)
    avoided = avoided_tokens(tokenizer, asked, template_ids, mask)[1:]  # as targets: shifted by one, like them
    assert ids.shape == (48, 2) and sum(map(len, avoided)) >= 4
    for position in range(48):
        want = avoided[position] if position < len(avoided) else []  # the padding avoids nothing
        assert ids[position].tolist() == want + [-1] * (2 - len(want))
        assert not want or targets[position] != -100
    assert torch.equal(avoid_weights, (ids >= 0).float() * 19.0)


def test_words_requests_ask_for_content_words_not_function_words_or_contraction_stumps():
    tale = "Lily didn't like the dog's ball. She really wanted a kite, and she ran around until dark. Lily smiled."
    assert request_words(tale) == ["ball", "wanted", "kite", "dark", "smiled"]  # the dog's ball stays
    for seed in range(10):
        assert set(words_request(tale, random.Random(seed)).content) <= set(request_words(tale))


def test_the_word_in_front_of_a_word_tells_its_role_the_first_role_that_fits():
    assert word_roles("The cat wanted to play. It was very happy.") == {"cat": "thing", "play": "action",
                                                                        "happy": "quality"}
    assert word_roles("Lily didn't know. Let's swim! She felt tired, so tired.") == {
        "know": "action", "swim": "action", "tired": "quality"}
    assert word_roles("He had to eat the cake. The cake was so sweet.") == {"eat": "action", "cake": "thing",
                                                                            "sweet": "quality"}
    roles = word_roles("They wanted to dance, and the bird was very kind. It looked scared.")
    assert [swap_group(word, roles) for word in ("dance", "bird", "kind", "scared", "wanted")] == [
        ("action", ""), ("thing", ""), ("quality", ""), ("quality", "ed"), ("other", "ed")]


def test_a_swapped_words_request_asks_for_words_put_in_place_of_three_of_the_storys_own():
    tale = ("Once upon a time, Lily had a red ball. She was running in the garden with her ball. "
            "Garden flowers were happy. The dog jumped and barked loudly. The flowers were pretty.")
    roles = word_roles(tale)
    assert swap_group("ball", roles) == ("thing", "") and swap_group("flowers", roles) == ("thing", "s")
    assert swap_group("jumped", roles) == ("other", "ed") and swap_group("loudly", roles) == ("other", "ly")
    assert swap_group("happy", roles) is None  # an uninflected word with no cue may be any part of speech
    pool = swap_pool([tale, "A kite and a boat. The frog hopped and hummed. The cakes and the toys were sweet.",
                      "A rocket, a pond, a bench, a shoe, a hill and some trees. It sang softly and smiled."])
    assert set(pool[("other", "ed")]) == {"jumped", "barked", "hopped", "hummed", "smiled"}
    for seed in range(20):
        request = swapped_words_request(tale, random.Random(seed), pool)
        assert request.kind == "words" and len(set(request.content)) == 3
        assert not set(request.content) & set(story_words(tale))  # words the original story does not hold
        assert set(request.content) <= {word for words in pool.values() for word in words}
        assert all(re.search(rf"\b{word}\b", request.reply, re.I) for word in request.content)
        assert all(word in request.text for word in request.content)
        gone = set(story_words(tale)) - set(story_words(request.reply))
        assert len(gone) == 3 and sorted(map(word_ending, gone)) == sorted(map(word_ending, request.content))
        assert all(swap_group(word, roles) is not None for word in gone)
        assert not any(re.search(rf"\b{word}\b", request.reply, re.I) for word in gone)  # capitalised too


def test_swapped_words_are_a_share_of_the_words_requests_and_none_by_default():
    rng = random.Random(3)
    things = ["kite", "ball", "cake", "boat", "tree", "house", "garden", "rocket", "apple", "shell", "bench", "drum"]
    stories = [f"{story(rng)} The {a} was near the {b}, and the {c} was red." for a, b, c in
               (rng.sample(things, 3) for _ in range(200))]
    assert conversations_from_stories(stories, seed=4, swapped_words=0.0) == conversations_from_stories(stories, seed=4)
    swapped = conversations_from_stories(stories, seed=4, swapped_words=1.0, multi_turn=0, system=0)
    words = [c for c in swapped if "words" in c[0]["content"]]
    assert words and not any(c[1]["content"] in s for c in words for s in stories)  # each a changed story
    assert all(any(c[1]["content"] in s for s in stories) for c in swapped if "words" not in c[0]["content"])


def test_long_conversations_lose_their_oldest_turns_but_keep_the_system_prompt(tokenizer):
    long = [CHAT[0]] + CHAT[1:] * 10
    kept, dropped = fit_conversation(long, tokenizer, max_tokens=40)
    assert kept[0] == CHAT[0] and kept[1]["role"] == "user" and kept[-1] == long[-1]
    assert dropped == len(long) - len(kept) and len(tokenizer.apply_chat_template(kept)) <= 40


# --------------------------------------------------------------------- fine-tuning

def tiny_model_and_rows(tokenizer) -> tuple[TransformerLM, torch.Tensor, torch.Tensor]:
    """A small random model, and the inputs and targets of two chat rows."""
    torch.manual_seed(0)
    model = TransformerLM(TransformerConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2,
                                            num_attention_heads=4, intermediate_size=64, max_position_embeddings=64,
                                            window_size=None, dropout=0.0)).eval()
    examples = ChatExamples([CHAT[1:3], CHAT], tokenizer, block_size=48)
    return model, examples.inputs, examples.targets


def test_the_fine_tuning_loss_is_cross_entropy_over_assistant_tokens_only(tokenizer):
    model, inputs, targets = tiny_model_and_rows(tokenizer)
    with torch.no_grad():
        loss = model(inputs, targets=targets).loss
        logits = model(inputs).logits
    by_hand, count = 0.0, 0
    for row in range(2):
        ids, mask = tokenizer.apply_chat_template([CHAT[1:3], CHAT][row], return_mask=True)
        for position in range(len(ids) - 1):
            if mask[position + 1]:  # the token to predict is an assistant token
                by_hand -= F.log_softmax(logits[row, position], -1)[ids[position + 1]].item()
                count += 1
    assert count == int((targets != -100).sum())
    assert loss.item() == pytest.approx(by_hand / count, rel=1e-5)


def test_loss_weights_give_the_weighted_mean_over_counted_targets_in_both_heads(tokenizer):
    model, inputs, targets = tiny_model_and_rows(tokenizer)
    weights = torch.rand(targets.shape) * 10  # also on -100 targets, which must still count for nothing
    with torch.no_grad():
        logits = model(inputs).logits
        loss = model(inputs, targets=targets, loss_weights=weights).loss
    nll = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100, reduction="none")
    counted = weights.flatten() * (targets.flatten() != -100)
    assert loss.item() == pytest.approx(((nll * counted).sum() / counted.sum()).item(), rel=1e-5)
    chunked = use_chunked_loss(model.train())
    assert chunked(inputs, targets=targets, loss_weights=weights).loss.item() == pytest.approx(loss.item(), rel=1e-5)


def test_avoided_tokens_add_their_weighted_minus_log_one_minus_p_in_both_heads(tokenizer):
    model, inputs, targets = tiny_model_and_rows(tokenizer)
    weights = torch.rand(targets.shape) * 10
    ids = torch.randint(-1, tokenizer.vocab_size, (*targets.shape, 2))  # -1: nothing avoided there
    avoided = AvoidedTokens(ids, torch.rand(ids.shape) * 5)
    logits = model(inputs).logits.detach()
    nll = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100, reduction="none")
    counted = weights.flatten() * (targets.flatten() != -100)
    p = torch.softmax(logits, -1).gather(-1, ids.clamp(min=0))  # (batch, seq, 2)
    pushed_down = (-torch.log(1 - p) * avoided.weights * (ids >= 0)).sum()
    expected = ((nll * counted).sum() + pushed_down) / counted.sum()
    plain = model(inputs, targets=targets, loss_weights=weights, avoided=avoided).loss
    assert plain.item() == pytest.approx(expected.item(), rel=1e-5)
    plain_grads = torch.autograd.grad(plain, list(model.parameters()))
    chunked = use_chunked_loss(model.train())
    loss = chunked(inputs, targets=targets, loss_weights=weights, avoided=avoided).loss
    assert loss.item() == pytest.approx(plain.item(), rel=1e-5)
    for got, want in zip(torch.autograd.grad(loss, list(model.parameters())), plain_grads, strict=True):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("balancing_weight, learned", [(0.0, 20 * 0.3 / (20 * 0.3 + 0.7)), (19.0, 0.3)])
def test_balancing_brings_a_stressed_words_learned_probability_back_to_its_rate(balancing_weight, learned):
    """One context, seen ten times: three times the requested word (token 0) comes next, at
    weight 20; seven times another token does. Stressed alone, the loss is lowest where the
    model says the word with probability 20 x 0.3 / (20 x 0.3 + 0.7) = 0.90; pushed down with
    weight 19 where it did not come, at the rate it came, 0.3."""
    torch.manual_seed(0)
    head, x = LMHead(TransformerConfig(vocab_size=4, hidden_size=4, num_attention_heads=1)), torch.ones(1, 10, 4)
    weight = torch.zeros(4, 4, requires_grad=True)
    targets = torch.tensor([[0, 0, 0, 1, 1, 2, 2, 3, 3, 3]])
    loss_weights = torch.where(targets == 0, 20.0, 1.0)
    ids = torch.where(targets == 0, -1, 0)[..., None]  # avoid the word wherever it did not come
    avoided = AvoidedTokens(ids, (ids >= 0).float() * balancing_weight)
    optimizer = torch.optim.LBFGS([weight], max_iter=500, tolerance_grad=1e-9, tolerance_change=1e-12)

    def closure():
        optimizer.zero_grad()
        loss = head(x, weight, targets, loss_weights, avoided)[1]
        loss.backward()
        return loss

    optimizer.step(closure)
    assert torch.softmax(head.logits(x[0, 0], weight), -1)[0].item() == pytest.approx(learned, abs=1e-3)


@pytest.fixture(scope="module")
def base_checkpoint(tmp_path_factory):
    """A tiny pretrained model: a few hundred steps on generated stories."""
    folder = write_story_corpus(tmp_path_factory.mktemp("base"), train=300, valid=40)
    story_tokenizer(320).save(folder / "tok.json")
    pretrain(["--dataset", str(folder), "--tokenizer_path", str(folder / "tok.json"), "--output_dir",
              str(folder / "run"), "--max_steps", "60", "--eval_interval", "30", "--learning_rate", "3e-3",
              "--batch_size", "8", "--sample_tokens", "4", "--num_workers", "1", "--block_size", "64", *TINY_MODEL])
    return folder


def test_fine_tuning_on_conversations_lowers_the_assistant_loss(base_checkpoint, tmp_path):
    state = train_tinystories_chat_model.main([
        "--base_model", str(base_checkpoint / "run" / "best_model.pth"), "--from_stories", str(base_checkpoint),
        "--output_dir", str(tmp_path / "chat"), "--block_size", "64", "--batch_size", "8", "--max_steps", "20",
        "--eval_interval", "10", "--max_val_conversations", "16", "--learning_rate", "3e-3", "--warmup_steps", "0", "--sample_tokens", "4",
        "--dropout", "0.05", "--attention_dropout", "0.2"])
    losses = [h["val_loss"] for h in state["history"]]
    assert losses[-1] < losses[0]
    lines = (tmp_path / "chat" / "conversations_train.jsonl").read_text(encoding="utf-8").splitlines()
    assert json.loads(lines[0])["messages"][-1]["role"] == "assistant"
    model, _, metadata = load_checkpoint(tmp_path / "chat" / "final_model.pth")
    assert metadata["kind"] == "chat"
    assert (model.config.dropout, model.config.attention_dropout) == (0.05, 0.2)  # the overrides were trained with


def test_the_sample_at_each_evaluation_is_a_reply_sent_through_the_chat_template(base_checkpoint, tmp_path,
                                                                                 monkeypatch):
    """The chat script's prompt_ids hook reaches the loop: the sample prompt is a user turn and
    ends with <assistant>, not the prompt encoded as plain text."""
    prompts = record_sample_prompts(monkeypatch)
    train_tinystories_chat_model.main([
        "--base_model", str(base_checkpoint / "run" / "best_model.pth"), "--from_stories", str(base_checkpoint),
        "--output_dir", str(tmp_path / "chat"), "--block_size", "64", "--batch_size", "8", "--max_steps", "2",
        "--eval_interval", "1", "--max_val_conversations", "8", "--sample_tokens", "4", "--select_requests", "0",
        "--sample_prompt", "Tell me a story."])
    tokenizer = BPETokenizer.load(base_checkpoint / "tok.json")
    expected = tokenizer.apply_chat_template([{"role": "user", "content": "Tell me a story."}],
                                             add_generation_prompt=True)
    assert prompts == [expected, expected]
    assert expected[0] == tokenizer.special_tokens["<user>"] and expected[-1] == tokenizer.special_tokens["<assistant>"]


def fine_tune_args(base_checkpoint, output, *extra):
    return ["--base_model", str(base_checkpoint / "run" / "best_model.pth"), "--from_stories", str(base_checkpoint),
            "--output_dir", str(output), "--block_size", "64", "--batch_size", "8", "--max_val_conversations", "8",
            "--sample_tokens", "4", "--warmup_steps", "0", *extra]


def test_fresh_requests_are_new_every_epoch_and_the_same_for_the_same_epoch(tokenizer):
    rng = random.Random(4)
    stories = [" ".join(f"{rng.choice(['Tom', 'Sue', 'Max'])} saw a {word} and a {rng.choice(['ball', 'tree'])}."
                        for word in rng.sample(["apple", "rocket", "garden", "river", "kitten", "castle", "pencil",
                                                "window", "blanket", "cookie"], 8)) for _ in range(40)]
    data = FreshChatExamples(stories, tokenizer, block_size=128, seed=0)
    first_rows, first = data[3], data.conversations
    data.set_epoch(1)
    requests = [[[m["content"] for m in c if m["role"] == "user"] for c in epoch] for epoch in (first, data.conversations)]
    same = sum(a == b for a, b in zip(requests[0], requests[1], strict=True))
    assert same < len(stories) // 4  # new words, names, cut points and phrasings
    data.set_epoch(0)
    assert all(torch.equal(a, b) for a, b in zip(data[3], first_rows, strict=True))  # what --resume relies on


def test_resumed_fine_tuning_with_fresh_requests_ends_with_the_same_weights(base_checkpoint, tmp_path, monkeypatch):
    """The training conversations change every epoch; an interrupted run, resumed, still
    reads the same rows in the same order as a straight one."""
    args = ("--max_steps", "80", "--eval_interval", "40", "--select_requests", "0", "--dropout", "0.1")
    train_tinystories_chat_model.main(fine_tune_args(base_checkpoint, tmp_path / "straight", *args))
    original_step = training.train_step

    def step_then_interrupt(run):
        result = original_step(run)
        if run.state["step"] == 45:  # in the second epoch (one is 37 steps: 300 stories, 8 a batch)
            run.stop_signal = signal.SIGINT
        return result

    monkeypatch.setattr(training, "train_step", step_then_interrupt)
    with pytest.raises(KeyboardInterrupt, match="--resume"):
        train_tinystories_chat_model.main(fine_tune_args(base_checkpoint, tmp_path / "resumed", *args))
    monkeypatch.setattr(training, "train_step", original_step)
    train_tinystories_chat_model.main(fine_tune_args(base_checkpoint, tmp_path / "resumed", *args, "--resume"))
    straight, resumed = (load_checkpoint(tmp_path / name / "final_model.pth")[0].state_dict()
                         for name in ("straight", "resumed"))
    assert all(torch.equal(straight[name], resumed[name]) for name in straight)


def test_the_best_model_is_the_one_that_follows_requests_best_not_the_lowest_loss(base_checkpoint, tmp_path,
                                                                                 monkeypatch):
    scores = iter([0.2, 0.9, 0.1, 0.3])
    asked = []

    def scripted_rates(model, tokenizer, stories, per_kind, seed, max_new_tokens):
        asked.append((len(stories), per_kind, max_new_tokens))
        score = next(scores)
        return {"words": {"requests": per_kind, "followed": score / 2, "control": 0.0, "each word": score,
                          "uses per word": 2.5}}

    monkeypatch.setattr(train_tinystories_chat_model, "follow_rates", scripted_rates)
    state = train_tinystories_chat_model.main(fine_tune_args(
        base_checkpoint, tmp_path / "chat", "--max_steps", "20", "--eval_interval", "5", "--patience", "2",
        "--select_requests", "3", "--select_stories", "30", "--learning_rate", "3e-3"))
    assert asked[0] == (30, 3, 32)  # held-out stories, three requests a kind, replies up to half a row
    assert [h["score"] for h in state["history"]] == [0.2, 0.9, 0.1, 0.3]
    assert state["history"][1]["follow/words"] == 0.45 and state["best_score"] == 0.9  # the score counts each word
    assert state["history"][1]["follow/words: each word"] == 0.9
    assert state["history"][1]["follow/words: uses per word"] == 2.5
    _, _, metadata = load_checkpoint(tmp_path / "chat" / "best_model.pth")
    assert metadata["step"] == 10
    assert min(state["history"], key=lambda h: h["val_loss"])["step"] != 10  # the loss alone would choose another


def test_a_tied_score_goes_to_the_lower_loss():
    state = {"best_score": 0.5, "best_val_loss": 2.0}
    assert training.is_improvement({"score": 0.6, "val_loss": 3.0}, state)
    assert training.is_improvement({"score": 0.5, "val_loss": 1.9}, state)
    assert not training.is_improvement({"score": 0.5, "val_loss": 2.1}, state)
    assert not training.is_improvement({"score": 0.4, "val_loss": 1.0}, state)
    assert training.is_improvement({"val_loss": 1.9}, {"best_val_loss": 2.0})  # no score: the loss decides


@pytest.mark.parametrize("requested_weight, balancing_weight", [("1", "0"), ("20", "0"), ("20", "19")])
def test_accumulated_fine_tuning_weighs_every_assistant_token_alike(base_checkpoint, tmp_path, requested_weight,
                                                                    balancing_weight):
    """Assistant tokens (and their loss weights) fall unevenly across micro-batches;
    accumulating two micro-batches of 4 still gives the gradient of one batch of 8 (the
    weighted mean over all its assistant tokens)."""
    def tune(name, *extra):
        train_tinystories_chat_model.main([
            "--base_model", str(base_checkpoint / "run" / "best_model.pth"), "--from_stories", str(base_checkpoint),
            "--output_dir", str(tmp_path / name), "--block_size", "64", "--max_steps", "1", "--eval_interval", "1000",
            "--max_val_conversations", "8", "--warmup_steps", "0", "--lr_schedule", "constant", "--grad_clip", "0",
            "--dropout", "0", "--no-amp", "--sample_tokens", "4", "--select_requests", "0",
            "--requested_weight", requested_weight, "--balancing_weight", balancing_weight, *extra])
        return load_checkpoint(tmp_path / name / "final_model.pth")[0].state_dict()

    big, accumulated = tune("big", "--batch_size", "8"), tune("small", "--batch_size", "4", "--gradient_accumulation_steps", "2")
    # Adam's first step moves each weight by about the learning rate (1e-4) times its gradient's
    # sign, so a wrongly weighted gradient shows as differences of up to 2e-4; float rounding,
    # which differs between processors, stays far below lr / 10 (1.7e-6 on an AMD EPYC).
    for name in big:
        torch.testing.assert_close(accumulated[name], big[name], atol=1e-5, rtol=0)


def test_dropout_overrides_reach_every_dropout_layer_and_the_attention():
    model = TransformerLM(TransformerConfig(vocab_size=300, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                            intermediate_size=32, max_position_embeddings=32, window_size=None))
    train_tinystories_chat_model.set_dropout(model, 0.05, None)
    train_tinystories_chat_model.set_dropout(model, None, 0.2)
    assert {m.p for m in model.modules() if isinstance(m, torch.nn.Dropout)} == {0.05}
    attention_rates = {m.config.attention_dropout for m in model.modules() if hasattr(m, "config")}
    assert attention_rates == {0.2} and model.config.dropout == 0.05


def test_a_base_model_without_chat_tokens_is_refused(tmp_path):
    plain = BPETokenizer.train(["a b c d e f"] * 5, vocab_size=262, special_tokens=["<|endoftext|>"])
    model = TransformerLM(TransformerConfig(vocab_size=plain.vocab_size, hidden_size=16, num_hidden_layers=1,
                                            num_attention_heads=2, intermediate_size=32, max_position_embeddings=32,
                                            window_size=None))
    save_checkpoint(tmp_path / "plain.pth", model, plain)
    with pytest.raises(ValueError, match=r"lacks the chat special tokens \['<user>', '<assistant>', '<system>'\]"):
        train_tinystories_chat_model.main(["--base_model", str(tmp_path / "plain.pth"), "--from_stories", "x.txt",
                                           "--output_dir", str(tmp_path / "out")])


# --------------------------------------------------------------------------- REPL

@pytest.fixture(scope="module")
def chat_checkpoint(base_checkpoint):
    return base_checkpoint / "run" / "best_model.pth"  # any checkpoint with the chat tokens can chat


@pytest.fixture(scope="module")
def endless_checkpoint(tmp_path_factory, tokenizer):
    path = tmp_path_factory.mktemp("endless") / "endless.pth"
    save_checkpoint(path, endless_model(tokenizer), tokenizer)
    return path


def test_the_repl_reads_one_message_per_line_from_a_pipe(chat_checkpoint, tmp_path):
    script = "Tell me a story.\n\n/set temperature 0.5\n/history\nAnother one.\n/save {}\n/quit\n".format(
        tmp_path / "chat.json")
    result = subprocess.run([sys.executable, str(REPO / "chat_with_tinystories_model.py"), "--model_path",
                             str(chat_checkpoint), "--max_new_tokens", "12", "--seed", "0", "--system", "Be kind."],
                            input=script, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "> Tell me a story." in result.stdout and "(temperature = 0.5)" in result.stdout
    assert "system: Be kind.\nuser: Tell me a story.\nassistant:" in result.stdout
    saved = json.loads((tmp_path / "chat.json").read_text(encoding="utf-8"))["messages"]
    assert [m["role"] for m in saved] == ["system", "user", "assistant", "user", "assistant"]


def test_a_forced_reply_uses_the_words(chat_checkpoint):
    script = "/force\n/force bad, jig\nTell me a story.\n/history\n/quit\n"
    result = subprocess.run([sys.executable, str(REPO / "chat_with_tinystories_model.py"), "--model_path",
                             str(chat_checkpoint), "--max_new_tokens", "16", "--seed", "0"],
                            input=script, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "usage: /force WORDS" in result.stdout and "(the next reply must use: bad, jig)" in result.stdout
    reply = result.stdout.split("assistant: ")[1]
    assert " bad" in reply.lower() and " jig" in reply.lower()  # " bad" or " Bad"


def test_forced_words_that_cannot_fit_are_a_note_and_the_chat_goes_on(chat_checkpoint):
    script = "/set max_new_tokens 1\n/force bad jig\nTell me a story.\n/history\n/quit\n"
    result = subprocess.run([sys.executable, str(REPO / "chat_with_tinystories_model.py"), "--model_path",
                             str(chat_checkpoint), "--seed", "0"], input=script, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert "[/force: the forced words' shortest spellings take" in result.stdout and "user: Tell me a story." in result.stdout


@pytest.mark.parametrize("flags, message", [(["--temperature", "-1"], "temperature must be a finite number >= 0"),
                                            (["--top_p", "2"], r"top_p must be in (0, 1]"),
                                            (["--max_new_tokens", "0"], "max_new_tokens must be from 1 to")])
def test_bad_sampling_flags_are_one_clear_line_before_the_chat_starts(chat_checkpoint, flags, message):
    result = subprocess.run([sys.executable, str(REPO / "chat_with_tinystories_model.py"), "--model_path",
                             str(chat_checkpoint), *flags], input="Hello\n", capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and result.stdout == ""


def test_the_repl_in_a_terminal_with_commands_ctrl_c_and_ctrl_d(endless_checkpoint):
    pexpect = pytest.importorskip("pexpect")
    child = pexpect.spawn(sys.executable, [str(REPO / "chat_with_tinystories_model.py"), "--model_path",
                                           str(endless_checkpoint), "--max_new_tokens", "30", "--seed", "1"],
                          encoding="utf-8", timeout=60, preexec_fn=default_stop_signals)
    child.expect("/help lists the commands")
    child.expect("> ")
    child.sendline("Tell me a story about Tom.")
    child.expect("> ")
    child.sendline("/set top_k 5")
    child.expect(r"\(top_k = 5\)")
    child.sendline("/reset")
    child.expect(r"\(conversation forgotten\)")
    child.sendline("/history")
    child.expect(r"\(empty\)")
    child.sendline("/set max_new_tokens 100000")
    child.expect(r"\(max_new_tokens = 100000\)")
    child.sendline("Tell me a very long story. \x01🙂")
    child.expect("🙂\r\n")  # the line is in (its echo ends with the emoji) ...
    child.expect(r"\S")  # ... and the reply has started
    child.sendintr()  # Ctrl-C stops the reply and returns to the prompt
    child.expect(r"\[stopped\]")
    child.sendline("/set temperature -1")  # refused with the rule; the REPL goes on
    child.expect(r"/set temperature: temperature must be a finite number >= 0")
    child.sendline("/set temperature nan")  # NaN fails every rule
    child.expect(r"/set temperature: temperature must be a finite number >= 0 \(0 means greedy\), not nan")
    child.sendline("/set max_new_tokens 5")
    child.expect(r"\(max_new_tokens = 5\)")
    child.sendline("Another story, please.")  # a second full turn after the interrupted one
    child.expect("Another story, please.")  # its echo ...
    child.expect("\r\n> ")  # ... then the whole reply, and the prompt is back
    child.sendeof()  # Ctrl-D leaves
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def test_held_out_shares_are_split_by_story_so_no_story_is_in_two_sets(tmp_path, tokenizer):
    stories = [f"Story {i} begins here. A child named Kid{i} found a red ball. The ball made Kid{i} glad. "
               f"That was story {i}." for i in range(60)]
    (tmp_path / "stories.txt").write_text("".join(s + "\n<|endoftext|>\n" for s in stories), encoding="utf-8")
    args = train_tinystories_chat_model.parse_args(["--base_model", "unused.pth", "--from_stories",
                                                    str(tmp_path / "stories.txt"), "--val_fraction", "0.25",
                                                    "--select_stories", "5"])
    sets = train_tinystories_chat_model.split_data(args)
    _, _, built = train_tinystories_chat_model.training_rows(args, tokenizer, sets)

    def story_numbers(conversations):  # every assistant reply names the story it comes from
        return {int(n) for c in conversations for m in c if m["role"] == "assistant"
                for n in re.findall(r"[Ss]tory (\d+)", m["content"])}

    selected = {int(n) for text in sets["select"] for n in re.findall(r"[Ss]tory (\d+)", text)}
    numbers = [story_numbers(built["train"]), story_numbers(built["validation"]), selected]
    assert [len(sets[name]) for name in ("train", "validation", "select")] == [40, 15, 5]
    assert all(numbers) and not (numbers[0] & numbers[1] or numbers[0] & numbers[2] or numbers[1] & numbers[2])


def test_save_never_replaces_a_file_and_a_message_keeps_all_but_control_characters(chat_checkpoint, tmp_path):
    family = "\U0001F468\u200d\U0001F469\u200d\U0001F467"  # one emoji: three people joined by zero-width joiners
    old = tmp_path / "model.pth"
    old.write_bytes(b"a checkpoint")
    script = f"Tell me about {family}\x1b\x00.\n/save {old}\n".encode() + b"caf\xe9 au lait\n/history\n/quit\n"
    result = subprocess.run([sys.executable, str(REPO / "chat_with_tinystories_model.py"), "--model_path",
                             str(chat_checkpoint), "--max_new_tokens", "4", "--seed", "0"],
                            input=script, capture_output=True, timeout=120)
    stdout = result.stdout.decode()
    assert result.returncode == 0, result.stderr.decode()
    assert f"/save: {old} exists; give a new file name" in stdout and old.read_bytes() == b"a checkpoint"
    assert f"user: Tell me about {family}.\n" in stdout
    assert "user: caf\ufffd au lait\n" in stdout  # a byte that is not UTF-8 is a replacement character, not an exit
