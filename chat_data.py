"""Chat data: conversations to instruction-tune on, loaded or built from stories.

A conversation is a list of {"role", "content"} messages, the format of chat data sets on the
hub. It comes from a "messages" column, from TinyStoriesInstruct-style text (metadata lines,
then "Story:"), or is built from plain stories (conversations_from_stories). The stories and
data sets are read by tinystories_data.py, the one place that loads data.

The file, top to bottom:
- the TinyStoriesInstruct features and the system prompts;
- loading: check_messages, instruct_entries, parse_instruct_entry (InstructEntry),
  instruct_conversation, load_conversations;
- requests made from a story (Request; REQUEST_MAKERS: words_request (of request_words),
  name_request, continuation_request), each in many phrasings; swapped_words_request, for
  words the story did not hold (with word_ending, word_roles, swap_group and swap_pool);
- conversations_from_stories and fit_conversation;
- the loss's view of a reply: first_uses and requested_tokens (the tokens that show a request
  was followed), token_weights (which stress them) and avoided_tokens (which balance them);
- training rows: ChatExamples (the loss is the assistant's alone) and FreshChatExamples
  (conversations built anew every epoch).
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Callable

import regex
import torch

from bpe_tokenizer import CHAT_ROLES, ENDOFTEXT, BPETokenizer
from tinystories_data import DataError, load_split, story_names, story_sentences, story_words

INSTRUCT_FEATURES = {
    "dialogue": "has some dialogue", "twist": "has a twist", "badending": "has a sad ending",
    "moralvalue": "teaches a lesson", "foreshadowing": "uses foreshadowing", "conflict": "has a conflict",
}
SYSTEM_PROMPTS = [
    "You write short, simple stories for young children.",
    "You are a friendly storyteller. Use easy words.",
    "You are a helpful assistant who tells kind stories.",
    "You tell stories to a small child. Keep them short and happy.",
    "You are a storyteller. Do what the user asks.",
    "Write simple stories with easy words.",
    "You are a kind helper who loves telling stories.",
    "You answer with a short story for children.",
]



def check_messages(messages, where: str) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: messages must be a non-empty list")
    for message in messages:
        if not isinstance(message, dict) or message.get("role") not in CHAT_ROLES or not isinstance(message.get("content"), str):
            raise DataError(f"{where}: each message needs a role ({', '.join(CHAT_ROLES)}) and a text content")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def instruct_entries(texts: list[str]) -> list[str]:
    """TinyStoriesInstruct entries. Its .txt files hold whole entries between <|endoftext|>
    lines (read_story_file already split them); on the hub every line is a row of its own,
    with <|endoftext|> rows between entries, so those rows are joined back first."""
    if any(text.strip() == ENDOFTEXT for text in texts):
        return [entry for entry in "\n".join(texts).split(ENDOFTEXT) if entry.strip()]
    return texts


@dataclasses.dataclass
class InstructEntry:
    story: str
    features: list[str] = dataclasses.field(default_factory=list)
    words: list[str] = dataclasses.field(default_factory=list)
    summary: str = ""
    sentence: str = ""


def parse_instruct_entry(entry: str) -> InstructEntry | None:
    """Metadata lines in any order ("Features: Dialogue, Twist", "Words: quit, oak, gloomy",
    "Summary: ...", "Random sentence: ..."), then "Story:" and the story. None without a story."""
    fields: dict[str, str] = {}
    story: list[str] | None = None
    for line in entry.splitlines():
        if story is not None:
            story.append(line)
            continue
        key, colon, value = line.partition(":")
        key = key.strip().lower()
        if colon and key == "story":
            story = [value.strip()]
        elif colon and key in ("features", "words", "summary", "random sentence"):
            fields[key] = value.strip()
    text = "\n".join(story).strip() if story else ""
    if not text:
        return None

    def items(value: str) -> list[str]:
        return [item.strip() for item in value.split(",") if item.strip()]

    return InstructEntry(text, items(fields.get("features", "")), items(fields.get("words", "")),
                         fields.get("summary", ""), fields.get("random sentence", ""))


def join_words(words: list[str]) -> str:
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " and " + words[-1]


def instruct_conversation(entry: InstructEntry, rng: random.Random) -> list[dict]:
    """A user request written from the entry's metadata in one of several phrasings, and the
    story as the reply."""
    wishes = []
    if entry.words:
        wishes.append(f"uses the words {join_words(entry.words)}")
    wishes += [INSTRUCT_FEATURES[f.lower()] for f in entry.features if f.lower() in INSTRUCT_FEATURES]
    if entry.sentence:
        wishes.append(f'includes the sentence "{entry.sentence}"')
    if entry.summary:
        wishes.append(f"is about this: {entry.summary}")
    rng.shuffle(wishes)
    if not wishes:
        request = rng.choice(["Tell me a story.", "Write a short story for a child."])
    else:
        request = rng.choice(["Write a story that {}.", "Can you tell me a story that {}?",
                              "Please write a short story that {}."]).format(join_words(wishes).rstrip(".!? "))
    return [{"role": "user", "content": request}, {"role": "assistant", "content": entry.story}]


def load_conversations(dataset: str, split: str = "train", sample: int = 0, seed: int = 0,
                       column: str = "messages") -> list[list[dict]]:
    """Conversations from a hub id or a local path: a `column` of messages, or text in the
    TinyStoriesInstruct layout, each entry turned into a request and the story as the reply."""
    table = load_split(dataset, split)
    if sample and sample < len(table):
        table = table.shuffle(seed=seed).select(range(sample))
    if column in table.column_names:
        conversations = [check_messages(messages, f"{dataset} row {i}") for i, messages in enumerate(table[column])]
    elif "text" in table.column_names:
        rng = random.Random(seed)
        entries = [parse_instruct_entry(text) for text in instruct_entries(list(table["text"]))]
        conversations = [instruct_conversation(entry, rng) for entry in entries if entry]
    else:
        raise DataError(f"{dataset}: no {column!r} column of messages and no text (columns: {table.column_names})")
    if not conversations:
        raise DataError(f"{dataset}: no conversations in split {split!r}")
    return conversations


# Requests a reply can be checked against (request_following.py checks them), each in many
# phrasings so that a model learns the request, not one sentence.
WORDS_PHRASINGS = [
    "Write a story that uses the words {}.", "Tell me a story with the words {}.",
    "Please write a short story using the words {}.", "Can you write a story that has the words {} in it?",
    "I want a story with these words: {}.", "Make up a story that includes the words {}.",
    "Use the words {} in a story.", "Tell a short story. It must use the words {}.",
]
NAME_PHRASINGS = [
    "Tell me a story about {}.", "Write a story about someone called {}.", "Can you tell me a story with {} in it?",
    "Please tell me a story where {} is the main character.", "I would like a story about {}.",
    "Make up a story about a character named {}.", "Write a short story. Call the main character {}.",
    "Tell a bedtime story about {}.",
]
CONTINUATION_PHRASINGS = [
    "Continue this story: {}", "Finish this story: {}", "Here is the start of a story. Please go on: {}",
    "What happens next? {}", "Please keep writing this story: {}", "Go on with this story: {}",
    "Write the rest of this story: {}", "This is how my story starts: {} Finish it, please.",
]
PLAIN_PHRASINGS = ["Tell me a story.", "Write a short story for a child.", "Can you tell me a bedtime story?"]
ANOTHER_PHRASINGS = ["Tell me another story.", "Now tell me a different story.", "One more story, please."]


@dataclasses.dataclass
class Request:
    """One user request made from a story, and what answers it."""
    kind: str  # "words", "name", "continuation" or "plain"
    text: str  # the user's message
    reply: str  # the reply to learn: the story, or for a continuation the rest of it
    content: list[str]  # what a reply must hold: the three words, the name, or the opening's characters


# Words of four letters or more that story_words keeps but that carry no content of their own:
# a request for "really, down and around" asks for nothing a story could be about.
FUNCTION_WORDS = frozenset("""about above across after again against almost alone along already always another
    anyone anything around away back before behind below beside besides between both cannot down during each
    either else enough even every everyone everything everywhere here herself himself itself later less many
    maybe more most much must myself near never next nothing once only other others over perhaps quite rather
    really same since someone something somewhere soon still such than these those though through together
    toward towards under until well where which while whole whose within without yourself themselves""".split())


def request_words(story: str) -> list[str]:
    """The story's content words (story_words) a user would ask for: no FUNCTION_WORDS, and
    no stump of a contraction ("didn" of "didn't")."""
    stumps = set(regex.findall(r"\b([a-z]+n)['’]t\b", story))
    return [word for word in story_words(story) if word not in FUNCTION_WORDS and word not in stumps]


def words_request(story: str, rng: random.Random) -> Request | None:
    """"Write a story that uses the words X, Y and Z", three of the story's request_words."""
    words = request_words(story)
    if len(words) < 3:
        return None
    chosen = rng.sample(words, 3)
    return Request("words", rng.choice(WORDS_PHRASINGS).format(join_words(chosen)), story, chosen)


def name_request(story: str, rng: random.Random) -> Request | None:
    """"Tell me a story about Lily", one of the story's two main characters."""
    names = story_names(story)
    if not names:
        return None
    name = rng.choice(names[:2])
    return Request("name", rng.choice(NAME_PHRASINGS).format(name), story, [name])


def continuation_request(story: str, rng: random.Random) -> Request | None:
    """"Continue this story: <its first one or two sentences>"; the reply is the rest, and the
    characters named in the opening who appear again in it are what a reply must keep."""
    sentences = story_sentences(story)
    if len(sentences) < 4:
        return None
    cut = rng.choice([1, 2])
    opening = " ".join(sentences[:cut])
    rest = story[story.index(sentences[cut - 1]) + len(sentences[cut - 1]):].strip()
    if not rest:
        return None
    characters = [name for name in story_names(story)
                  if regex.search(rf"\b{name}\b", opening) and regex.search(rf"\b{name}\b", rest)]
    return Request("continuation", rng.choice(CONTINUATION_PHRASINGS).format(opening), rest, characters)


REQUEST_MAKERS = {"words": words_request, "name": name_request, "continuation": continuation_request}


def word_ending(word: str) -> str:
    """A word's inflection by its ending ("ing", "ed", "ly", "s" or "")."""
    return next((ending for ending in ("ing", "ed", "ly", "s") if word.endswith(ending)), "")


# The words in front of a word that tell, mostly, what part of speech it is: a "thing" follows a
# determiner ("the ball", "his red kite": a noun or an adjective), an "action" follows "to" or a
# helping verb ("to know", "can help": a verb), and a "quality" follows a degree word or a verb
# of seeming ("very happy", "felt sad": an adjective).
ROLE_CUES = {
    "thing": "the|a|an|his|her|my|your|their|its|our|some",
    "action": "to|can|could|will|would|should|must|did|didn't|don't|let's",
    "quality": "very|so|too|felt|feel|feels|looked|looks|seemed|seems",
}


def word_roles(story: str) -> dict[str, str]:
    """The role of each word of the story that follows a cue of ROLE_CUES (the first role, in
    that order, when it follows several).

        word_roles("The cat wanted to play. It was very happy.")
        -> {"cat": "thing", "play": "action", "happy": "quality"}
    """
    roles: dict[str, str] = {}
    for role, cues in ROLE_CUES.items():
        for word in regex.findall(rf"\b(?i:{cues}) ([a-z]+)", story):
            roles.setdefault(word, role)
    return roles


def swap_group(word: str, roles: dict[str, str]) -> tuple[str, str] | None:
    """Which words a word may be swapped for without breaking its sentence, mostly: a word
    with a role (word_roles) for one of the same role and word_ending ("ball" for "kite",
    "know" for "help", "happy" for "sad"), and any other inflected word ("jumped", "singing",
    "slowly": a verb or an adverb) for one of the same ending. None for an uninflected word
    with no role ("know" in "I know"), which may be any part of speech."""
    ending = word_ending(word)
    if word in roles:
        return (roles[word], ending)
    return ("other", ending) if ending else None


def swap_pool(stories: list[str]) -> dict[tuple[str, str], list[str]]:
    """Every story's request_words, grouped by swap_group."""
    groups: dict[tuple[str, str], dict[str, None]] = {}  # each group's words, in order, once
    for story in stories:
        roles = word_roles(story)
        for word in request_words(story):
            if (group := swap_group(word, roles)) is not None:
                groups.setdefault(group, {})[word] = None
    return {group: list(words) for group, words in groups.items()}


def swapped_words_request(story: str, rng: random.Random, pool: dict[tuple[str, str], list[str]]) -> Request | None:
    """A words request for three words the story does not hold: three of its request_words
    are replaced throughout (capitalised too) by words of their swap_group from the pool, and
    the reply is the story so changed.

        "Write a story that uses the words kite, garden and jumped."  ->  "... Tom flew his kite ..."

    After pretraining, a model knows every training story by heart, so a request for a story's
    own words can be answered from memory of the story they key, without reading them. These
    replies it has never seen: their words can only come from the request."""
    roles = word_roles(story)
    groups = {word: group for word in request_words(story) if (group := swap_group(word, roles)) in pool}
    if len(groups) < 3:
        return None
    taken = set(story_words(story))
    swaps = {}
    for word in rng.sample(sorted(groups), len(groups)):  # in a random order, until three are swapped
        candidates = pool[groups[word]]
        for _ in range(20):  # a few draws find a word the story does not hold
            new = rng.choice(candidates)
            if new not in taken:
                swaps[word] = new
                taken.add(new)
                break
        if len(swaps) == 3:
            break
    if len(swaps) < 3:
        return None
    for old, new in swaps.items():
        story = regex.sub(rf"\b{old}\b", new, story)
        story = regex.sub(rf"\b{old.capitalize()}\b", new.capitalize(), story)
    chosen = list(swaps.values())
    return Request("words", rng.choice(WORDS_PHRASINGS).format(join_words(chosen)), story, chosen)


def _request_for(story: str, rng: random.Random, first: bool, checkable_weight: float,
                 makers: dict[str, Callable] = REQUEST_MAKERS) -> list[dict]:
    """One task derived from the story alone: the user's request and the assistant's reply,
    taken from the story. A request whose content a reply can be checked against is
    checkable_weight times as likely as a plain one; the reply names that content as
    "requested" (ChatExamples can stress its tokens in the loss)."""
    tasks = [request for make in makers.values() if (request := make(story, rng)) is not None]
    tasks.append(Request("plain", rng.choice(PLAIN_PHRASINGS if first else ANOTHER_PHRASINGS), story, []))
    (chosen,) = rng.choices(tasks, weights=[1.0 if task.kind == "plain" else checkable_weight for task in tasks])
    reply = {"role": "assistant", "content": chosen.reply} | ({"requested": chosen.content} if chosen.content else {})
    return [{"role": "user", "content": chosen.text}, reply]


def conversations_from_stories(stories: list[str], seed: int = 0, multi_turn: float = 0.3, system: float = 0.3,
                               checkable_weight: float = 3.0, swapped_words: float = 0.0) -> list[list[dict]]:
    """Conversations made from plain stories only, every reply a piece of a real story:
    "Tell me a story about <a character>", "Write a story that uses the words <three of its
    words>", "Continue this story: <its opening sentences>" (the reply is the rest), or a plain
    request (checkable requests checkable_weight times as likely). A share swapped_words of
    the words requests ask for words swapped into the story (swapped_words_request). A share
    become two-turn (a second request answered by the next story), and a share start with a
    system prompt. Seeded."""
    rng = random.Random(seed)
    makers = dict(REQUEST_MAKERS)
    if swapped_words:
        pool = swap_pool(stories)
        makers["words"] = lambda story, rng: (swapped_words_request(story, rng, pool) if rng.random() < swapped_words
                                              else words_request(story, rng))
    conversations = []
    for index, story in enumerate(stories):
        messages = [{"role": "system", "content": rng.choice(SYSTEM_PROMPTS)}] if rng.random() < system else []
        messages += _request_for(story, rng, True, checkable_weight, makers)
        if rng.random() < multi_turn and len(stories) > 1:
            messages += _request_for(stories[(index + 1) % len(stories)], rng, False, checkable_weight, makers)
        conversations.append(messages)
    return conversations


def fit_conversation(messages: list[dict], tokenizer: BPETokenizer, max_tokens: int,
                     add_generation_prompt: bool = False) -> tuple[list[dict], int]:
    """Drop the oldest turns (a system prompt stays) until the conversation's template fits
    in max_tokens; returns the kept messages and how many were dropped. A conversation
    never starts with an assistant turn; the last turn is never dropped."""
    kept = list(messages)
    dropped = 0
    while len(tokenizer.apply_chat_template(kept, add_generation_prompt)) > max_tokens:
        first = 1 if kept and kept[0]["role"] == "system" else 0
        if len(kept) - first <= 1:
            break  # only the newest turn is left: the caller cuts its tokens
        del kept[first]
        dropped += 1
        while len(kept) - first > 1 and kept[first]["role"] == "assistant":
            del kept[first]
            dropped += 1
    return kept, dropped


def first_uses(tokenizer: BPETokenizer, reply: str, requested: list[str]) -> list[list[int]]:
    """For each requested item (as a word, in any case) that the reply holds, the indices of
    the reply's tokens (tokenizer.encode(reply)) that spell its first use: the tokens that
    show the request was followed, where a model must read the request to be right.

        "Use the words kite and sun." -> "Tom had a red kite. The sun ..." -> [[4], [7]]
        (the tokens " kite" and " sun", when each word is one token)
    """
    spans, end = [], 0  # each token's [start, end) in the reply's UTF-8 bytes
    for token in tokenizer.encode(reply, allowed_special="none"):
        spans.append((end, end + len(tokenizer.vocab[token])))
        end += len(tokenizer.vocab[token])
    uses = []
    for item in requested:
        found = regex.search(rf"\b{regex.escape(item)}\b", reply, flags=regex.IGNORECASE)
        if found:
            first, last = len(reply[: found.start()].encode()), len(reply[: found.end()].encode())
            uses.append([k for k, (start, end) in enumerate(spans) if start < last and end > first])
    return uses


def requested_tokens(tokenizer: BPETokenizer, reply: str, requested: list[str]) -> list[int]:
    """The indices of the reply's tokens that spell the first use of each requested item
    (first_uses, all together, in order)."""
    return sorted({index for use in first_uses(tokenizer, reply, requested) for index in use})


def _replies(messages: list[dict], mask: list[bool]) -> list[tuple[int, dict]]:
    """Each assistant message with the index of its first token in the template's ids (where
    the mask, True on the assistant's tokens, starts a run)."""
    replies = iter(message for message in messages if message["role"] == "assistant")
    return [(start, next(replies)) for start in range(len(mask)) if mask[start] and (start == 0 or not mask[start - 1])]


def token_weights(tokenizer: BPETokenizer, messages: list[dict], mask: list[bool], requested_weight: float) -> list[float]:
    """Each token's weight in the loss, for the template's ids of messages and their mask:
    0 outside the assistant's turns, 1 in them, and requested_weight on the tokens of a
    reply that spell what its request asked for (requested_tokens of its "requested")."""
    weights = [float(keep) for keep in mask]
    for start, reply in _replies(messages, mask):
        for index in requested_tokens(tokenizer, reply["content"], reply.get("requested", [])):
            weights[start + index] = requested_weight
    return weights


def avoided_tokens(tokenizer: BPETokenizer, messages: list[dict], ids: list[int], mask: list[bool]) -> list[list[int]]:
    """For each of the template's ids, as a target: the token ids to push down there. Each
    requested item's first token (as its first use spells it) is avoided at the reply's
    tokens before that first use, except where the target is that token itself.

    Why: the first use of a requested word weighs requested_weight, so the loss pushes the
    word up requested_weight times harder where it comes than it pushes it down where it
    could have come and did not; the model learns to say it far more often than stories
    do. Pushing it down with weight requested_weight - 1 at those other places balances
    the two, so the model's odds of the word match the stories' again.

        "Use the word sun." -> "The sun was hot." -> " sun" avoided where the target is "The"
    """
    avoided = [[] for _ in ids]
    for start, reply in _replies(messages, mask):
        for use in first_uses(tokenizer, reply["content"], reply.get("requested", [])):
            word = ids[start + use[0]]
            for index in range(start, start + use[0]):
                if ids[index] != word:
                    avoided[index].append(word)
    return avoided


def _padded(rows: list[list[list[int]]], length: int, width: int) -> torch.Tensor:
    """Lists of ids per position, -1 padded to (rows, length, width)."""
    return torch.tensor([[ids + [-1] * (width - len(ids)) for ids in row] + [[-1] * width] * (length - len(row))
                         for row in rows], dtype=torch.long)


class ChatExamples(torch.utils.data.Dataset):
    """Conversations as training rows of block_size tokens: (inputs, targets, loss weights)
    with targets -100 everywhere but on assistant tokens, so the loss is the assistant's
    alone. The tokens that show a request was followed weigh requested_weight in it, the
    others 1 (token_weights). With balancing_weight, each row also brings the tokens the loss
    pushes down (avoided_tokens), as ids (seq, k) and weights (seq, k): the model's
    AvoidedTokens. One conversation per row, padded at the end with <|endoftext|>, so
    attention never crosses from one conversation into another. Too long a conversation
    loses its oldest turns first (truncated_turns counts them); what still does not fit is
    cut at the end."""

    def __init__(self, conversations: list[list[dict]], tokenizer: BPETokenizer, block_size: int,
                 requested_weight: float = 1.0, balancing_weight: float = 0.0):
        pad, length = tokenizer.special_tokens[ENDOFTEXT], block_size + 1
        rows, targets, weights, avoided = [], [], [], []
        self.truncated_turns = self.cut_conversations = 0
        for messages in conversations:
            messages, dropped = fit_conversation(messages, tokenizer, length)
            self.truncated_turns += dropped
            ids, mask = tokenizer.apply_chat_template(messages, return_mask=True)
            weight = token_weights(tokenizer, messages, mask, requested_weight)
            if balancing_weight:
                avoided.append(avoided_tokens(tokenizer, messages, ids, mask)[1:length])  # as targets, like weight
            self.cut_conversations += len(ids) > length
            padding = max(length - len(ids), 0)  # the padding's targets are -100, its weights 0, it avoids nothing
            ids, mask, weight = ids[:length] + [pad] * padding, mask[:length] + [False] * padding, weight[:length]
            rows.append(ids[:-1])
            targets.append([token if keep else -100 for token, keep in zip(ids[1:], mask[1:], strict=True)])
            weights.append(weight[1:] + [0.0] * padding)
        if not rows:
            raise DataError("no conversations to train on")
        self.inputs, self.targets, self.weights = torch.tensor(rows), torch.tensor(targets), torch.tensor(weights)
        self.balancing_weight = balancing_weight
        if balancing_weight:
            self.avoided = _padded(avoided, block_size, max(1, max(len(ids) for row in avoided for ids in row)))

    def __len__(self) -> int:
        return len(self.inputs)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, ...]:
        """(inputs, targets, weights), each (seq,); with balancing_weight also the avoided
        ids and their weights, each (seq, k)."""
        row = self.inputs[index], self.targets[index], self.weights[index]
        if not self.balancing_weight:
            return row
        ids = self.avoided[index]
        return *row, ids, (ids >= 0).float() * self.balancing_weight


class FreshChatExamples(torch.utils.data.Dataset):
    """ChatExamples whose conversations are built anew from the stories every epoch
    (conversations_from_stories, seeded by seed and the epoch): new words, names, cut points,
    phrasings and system prompts each time, so the model does not see the same request twice
    and cannot learn a request by heart. The training loop calls set_epoch, as it does for
    TokenWindows; an epoch's rows depend on its number alone, so --resume reads the same rows."""

    def __init__(self, stories: list[str], tokenizer: BPETokenizer, block_size: int, seed: int = 0,
                 requested_weight: float = 1.0, balancing_weight: float = 0.0, **building):
        self.stories, self.tokenizer, self.block_size, self.seed = stories, tokenizer, block_size, seed
        self.requested_weight, self.balancing_weight = requested_weight, balancing_weight
        self.building = building  # conversations_from_stories's other settings
        self.epoch = -1
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.conversations = conversations_from_stories(self.stories, self.seed * 1_000_003 + epoch, **self.building)
            self.examples = ChatExamples(self.conversations, self.tokenizer, self.block_size, self.requested_weight,
                                         self.balancing_weight)
            self.epoch = epoch

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, ...]:
        return self.examples[index]
