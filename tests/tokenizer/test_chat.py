"""Chat templates: ChatML fallback, SmolLM2 parity with transformers, assistant masks, errors."""


import pytest
from tokenizers import Tokenizer as Backend
from tokenizers import decoders, models, pre_tokenizers, trainers

from pagoda.errors import InvalidRequestError, WeightsError
from pagoda.model.gguf_io import read_gguf_metadata
from pagoda.tokenizer import Tokenizer, encode_chat, render_chat

CONVERSATIONS = [
    [{"role": "user", "content": "Hi"}],
    [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "And 3+3?"},
        {"role": "assistant", "content": " Six, of course.\n\nAnything else? 🎉"},
    ],
    [
        {"role": "user", "content": "你好"},
        {"role": "assistant", "content": "你好！有什么可以帮你的吗？"},
        {"role": "user", "content": "写一行 Python"},
        {"role": "assistant", "content": "print('hello')\n"},
    ],
]


def tiny_chatml_tokenizer(chat_template: str | None = None) -> Tokenizer:
    """A byte-level BPE trained in milliseconds, with ChatML control tokens."""
    backend = Backend(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(["user assistant system: hello, how are you? fine"] * 5, trainer)
    return Tokenizer(backend, eos_token="<|im_end|>", chat_template=chat_template)


def assert_mask_is_assistant_turns(tok: Tokenizer, messages: list[dict], end: str) -> None:
    """Each run of masked tokens decodes to one assistant content followed by the end token."""
    encoding = encode_chat(tok, messages)
    assert len(encoding.ids) == len(encoding.assistant_mask)
    runs: list[list[int]] = []
    previous = False
    for token_id, masked in zip(encoding.ids, encoding.assistant_mask, strict=True):
        if masked and not previous:
            runs.append([])
        if masked:
            runs[-1].append(token_id)
        previous = masked
    expected = [m["content"] + end for m in messages if m["role"] == "assistant"]
    assert [tok.decode(r) for r in runs] == expected


def test_chatml_fallback_without_template():
    tok = tiny_chatml_tokenizer()
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert render_chat(tok, messages) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )
    assert render_chat(tok, messages, add_generation_prompt=False).endswith("Hi<|im_end|>\n")


@pytest.mark.parametrize("messages", CONVERSATIONS[1:])
def test_chatml_assistant_mask(messages):
    tok = tiny_chatml_tokenizer()
    assert_mask_is_assistant_turns(tok, messages, "<|im_end|>")
    encoding = encode_chat(tok, messages)
    assert encoding.ids == tok.encode(render_chat(tok, messages, add_generation_prompt=False))
    prompt = encode_chat(tok, messages[:-1], add_generation_prompt=True)
    assert tok.decode(prompt.ids).endswith("<|im_start|>assistant\n")
    assert not any(prompt.assistant_mask[-3:])


def test_mask_for_template_that_trims_contents():
    template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] | trim }}<|im_end|>\n"
        "{% endfor %}"
    )
    tok = tiny_chatml_tokenizer(template)
    messages = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "  fine thanks \n"},
    ]
    encoding = encode_chat(tok, messages)
    masked = [i for i, m in zip(encoding.ids, encoding.assistant_mask, strict=True) if m]
    assert tok.decode(masked) == "fine thanks<|im_end|>"


def test_content_parts_and_template_helpers():
    template = (
        "{% generation %}{{ messages[0]['content'] }}{% endgeneration %}|{{ messages | tojson }}"
        "|{{ strftime_now('%Y') | length }}{% for m in messages %}{% break %}{% endfor %}"
    )
    tok = tiny_chatml_tokenizer(template)
    parts = [{"type": "text", "text": "a <b>"}, {"type": "text", "text": "c"}]
    text = render_chat(tok, [{"role": "user", "content": parts}])
    assert text == 'a <b>\nc|[{"role": "user", "content": "a <b>\\nc"}]|4'


@pytest.mark.parametrize(
    ("messages", "message"),
    [
        ([], "non-empty list"),
        ("hello", "non-empty list"),
        (["hello"], r"messages\[0\] must be an object"),
        ([{"role": 3, "content": "x"}], r"messages\[0\].role must be a non-empty string"),
        ([{"role": "user"}], r"messages\[0\] \(user\) has no content"),
        ([{"role": "user", "content": 5}], "must be a string or a list of text parts"),
        ([{"role": "user", "content": [{"type": "image_url"}]}], "'image_url'"),
    ],
)
def test_bad_messages(messages, message):
    with pytest.raises(InvalidRequestError, match=message):
        render_chat(tiny_chatml_tokenizer(), messages)


def test_template_errors():
    raising = tiny_chatml_tokenizer(
        "{{ raise_exception('Roles must alternate\\nuser/assistant') }}"
    )
    with pytest.raises(InvalidRequestError, match="Roles must alternate user/assistant"):
        render_chat(raising, [{"role": "user", "content": "x"}])
    with pytest.raises(WeightsError, match="chat template is invalid"):
        render_chat(tiny_chatml_tokenizer("{% for %}"), [{"role": "user", "content": "x"}])


@pytest.fixture(scope="module")
def smol(smol_gguf) -> Tokenizer:
    return Tokenizer.from_gguf_metadata(read_gguf_metadata(smol_gguf))


@pytest.mark.real_model
def test_smollm2_template_matches_transformers(smol, tmp_path):
    smol.save(tmp_path)  # the GGUF's template travels in tokenizer_config.json
    transformers = pytest.importorskip("transformers")
    reference = transformers.AutoTokenizer.from_pretrained(tmp_path)
    for messages in CONVERSATIONS:
        for prompt in (False, True):
            text = reference.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=prompt
            )
            assert render_chat(smol, messages, add_generation_prompt=prompt) == text
            assert encode_chat(smol, messages, prompt).ids == smol.encode(text)
    assert render_chat(smol, CONVERSATIONS[0]).startswith("<|im_start|>system\nYou are a helpful")


@pytest.mark.real_model
@pytest.mark.parametrize("messages", CONVERSATIONS[1:])
def test_smollm2_assistant_mask(smol, messages):
    assert_mask_is_assistant_turns(smol, messages, "<|im_end|>")
