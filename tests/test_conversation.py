"""Templates: which text is a target, the tokenizer's own chat template, the built-in fallback."""
import pytest

from demo.tiny.lm import build_tokenizer
from revision.conversation import normalise_turns, place_image, render, render_prompt, resolve_template, split_turns

TWO_TURNS = [
    {"from": "human", "value": "<image>\nwhat colour is it ?"}, {"from": "gpt", "value": "red"},
    {"from": "human", "value": "what shape is it ?"}, {"from": "gpt", "value": "circle"},
]


@pytest.fixture(scope="module")
def chat_tokenizer():
    return build_tokenizer()


@pytest.fixture(scope="module")
def bare_tokenizer():
    return build_tokenizer(chat_template=False)


def trained(segments):
    return [s.text for s in segments if s.train]


def test_plain_trains_only_the_caption(chat_tokenizer):
    segments = render([{"from": "human", "value": "<image>\nignored words"}, {"from": "gpt", "value": " a red star "}],
                      "plain", chat_tokenizer)
    assert [(s.text, s.train) for s in segments] == [("<s><image>", False), ("a red star</s>", True)]


def test_chat_uses_tokenizer_template_and_trains_assistant_turns(chat_tokenizer):
    segments = render(TWO_TURNS, "chat", chat_tokenizer)
    full = chat_tokenizer.apply_chat_template(
        [{"role": "user" if t["from"] == "human" else "assistant", "content": t["value"]} for t in TWO_TURNS],
        tokenize=False)
    assert "".join(s.text for s in segments) == full
    assert trained(segments) == ["red <|end|> ", "circle <|end|> "]
    assert all("<|assistant|>" in s.text for s in segments if not s.train)


def test_chat_falls_back_to_vicuna_without_a_template(bare_tokenizer):
    assert resolve_template("chat", bare_tokenizer) == "vicuna"
    segments = render(TWO_TURNS, "chat", bare_tokenizer)
    assert trained(segments) == [" red</s>", " circle</s>"]
    assert segments[1].text == " USER: <image>\nwhat colour is it ? ASSISTANT:"


def test_prompt_ends_with_the_assistant_cue(chat_tokenizer, bare_tokenizer):
    question = [{"from": "human", "value": "<image>\nwhat shape is it ?"}]
    assert render_prompt(question, "chat", chat_tokenizer).endswith("<|end|> <|assistant|> ")
    assert render_prompt(question, "vicuna", bare_tokenizer).endswith("ASSISTANT:")
    assert render_prompt(question, "plain", chat_tokenizer) == "<s><image>"


def test_bad_conversations_are_refused(chat_tokenizer):
    with pytest.raises(ValueError, match="2 <image> placeholders"):
        render([{"from": "human", "value": "<image> <image>"}, {"from": "gpt", "value": "x"}], "chat", chat_tokenizer)
    with pytest.raises(ValueError, match="turn 1 is not"):
        render([{"from": "human", "value": "hi"}, {"from": "robot", "value": "x"}], "chat", chat_tokenizer)
    with pytest.raises(ValueError, match="plain template takes one caption"):
        render(TWO_TURNS, "plain", chat_tokenizer)
    with pytest.raises(ValueError, match="unknown template"):
        render(TWO_TURNS, "llama9", chat_tokenizer)


def test_system_prompt_replaces_the_templates_default_in_training_and_prompts(chat_tokenizer, bare_tokenizer):
    """A template with a default system message (SmolLM2's: 21 tokens a sample): system_prompt replaces it, in the
    training text and the generation prompt alike; a conversation's own system turn is kept."""
    tokenizer = build_tokenizer()
    tokenizer.chat_template = ("{{ bos_token }}{% if messages[0]['role'] != 'system' %}<|system|> you are a model <|end|> "
                               "{% endif %}" + chat_tokenizer.chat_template.removeprefix("{{ bos_token }}"))
    default, short = render(TWO_TURNS, "chat", tokenizer), render(TWO_TURNS, "chat", tokenizer, system_prompt="")
    assert "you are a model" in default[0].text and "you are a model" not in short[0].text
    assert short[0].text.startswith("<s><|system|>  <|end|> <|user|>")
    assert trained(short) == trained(default) == ["red <|end|> ", "circle <|end|> "]
    question = TWO_TURNS[:1]
    assert short[0].text == render_prompt(question, "chat", tokenizer, system_prompt="")
    assert render_prompt(question, "chat", tokenizer).startswith("<s><|system|> you are a model")
    own = [{"from": "system", "value": "look"}, *TWO_TURNS]
    assert render(own, "chat", tokenizer, system_prompt="")[0].text.startswith("<s><|system|> look <|end|>")
    assert render(TWO_TURNS, "vicuna", bare_tokenizer, system_prompt="Be brief.")[0].text == "<s>Be brief."
    assert render_prompt(question, "plain", tokenizer, system_prompt="") == "<s><image>"


def test_the_image_moves_before_or_after_the_first_question():
    turns = normalise_turns(TWO_TURNS)
    last = place_image(turns, "last")
    assert [t["content"] for t in last] == ["what colour is it ?\n<image>", "red", "what shape is it ?", "circle"]
    assert place_image(last, "first") == turns
    later = [turns[0] | {"content": "hello"}, turns[1], turns[2] | {"content": "<image> what shape ?"}, turns[3]]
    assert [t["content"] for t in place_image(later, "first")][:3] == ["<image>\nhello", "red", "what shape ?"]
    image_free = normalise_turns([{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yes"}])
    assert place_image(image_free, "last") == image_free
    with pytest.raises(ValueError, match="unknown image placement 'middle'; choose from first, last"):
        place_image(turns, "middle")


def test_a_conversation_splits_into_one_sample_per_question_each_with_the_image():
    system = [{"role": "system", "content": "be brief"}]
    turns = system + normalise_turns(TWO_TURNS + [{"from": "human", "value": "and its size ?"}])
    pieces = split_turns(turns)  # the trailing question has no answer: nothing to train on, dropped
    assert [[t["content"] for t in piece] for piece in pieces] == [
        ["be brief", "<image>\nwhat colour is it ?", "red"], ["be brief", "<image>\nwhat shape is it ?", "circle"]]
    # the image goes where the conversation had it
    pieces = split_turns(place_image(normalise_turns(TWO_TURNS), "last"))
    assert [piece[0]["content"] for piece in pieces] == ["what colour is it ?\n<image>", "what shape is it ?\n<image>"]
    one = normalise_turns(TWO_TURNS[:2])
    assert split_turns(one) == [one]
    chat = normalise_turns([{"from": "human", "value": "a ?"}, {"from": "gpt", "value": "b"},
                            {"from": "human", "value": "c ?"}, {"from": "gpt", "value": "d"}])
    assert split_turns(chat) == [chat[:2], chat[2:]]
