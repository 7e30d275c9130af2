"""Tiny random-weight reward models for tests and local development.

Nothing can be downloaded on the machines this runs on, so both the tokenizer and the
model are made from scratch: the tokenizer is trained on a small embedded corpus and the
model gets random weights from a seeded generator. The result is saved exactly like a
Hugging Face checkpoint, so the service loads it through the same code path as a real one.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerFast

TinyArch = Literal["llama", "gpt2", "bert"]
TINY_ARCHS: tuple[TinyArch, ...] = ("llama", "gpt2", "bert")

_VOCAB_SIZE = 1024

# A few dozen varied sentences: enough for BPE/WordPiece to learn common English pieces,
# digits and punctuation, so ordinary prompts do not explode into one token per byte.
_CORPUS: tuple[str, ...] = (
    "The quick brown fox jumps over the lazy dog.",
    "What is the capital of France? The capital of France is Paris.",
    "Please write a short poem about the ocean at night.",
    "Photosynthesis converts light energy into chemical energy in plants.",
    "The stock market rose 2.5% on Tuesday after the report was released.",
    "To solve 3x + 7 = 22, subtract 7 and divide by 3, so x = 5.",
    "def add(a, b):\n    return a + b",
    "I'm sorry, but I can't help with that request.",
    "Sure! Here are three tips for better sleep: keep a schedule, avoid screens, relax.",
    "The Roman Empire lasted for centuries before its decline in the west.",
    "Water boils at 100 degrees Celsius at sea level (212 degrees Fahrenheit).",
    "Can you explain how a neural network learns from data?",
    "A reward model assigns a score to each response given a prompt.",
    "She bought 12 apples, 6 oranges and 3 bananas for $4.75.",
    "The meeting is scheduled for 10:30 AM on Monday, March 4th, 2024.",
    "Mount Everest is 8,849 meters tall and lies on the border of Nepal and China.",
    "Translate 'good morning' into Spanish: buenos dias.",
    "He said: 'Let us go to the park,' and we all agreed.",
    "Exercise regularly, eat vegetables, and drink plenty of water every day.",
    "The mitochondria is often called the powerhouse of the cell.",
    "In 1969, astronauts walked on the Moon for the first time.",
    "Recursion is when a function calls itself with a smaller input.",
    "Our team won the match 3-1 after a thrilling second half!",
    "Mix flour, sugar, two eggs and butter, then bake for 25 minutes.",
    "Interest rates, inflation and unemployment shape economic policy.",
    "Shakespeare wrote plays such as Hamlet, Macbeth and Romeo and Juliet.",
    "The train leaves at 7:15 and arrives at 9:40; tickets cost 30 euros.",
    "Why is the sky blue? Sunlight scatters off molecules in the air.",
    "Jazz music grew from blues and ragtime in New Orleans.",
    "Use a strong password with letters, numbers and symbols like #, @ and &.",
    "Climate change is driven by greenhouse gases such as carbon dioxide.",
    "The library opens at 9 and closes at 5; it is closed on Sundays.",
    "Is this answer helpful, honest and harmless? Rate it from 1 to 10.",
    "0 1 2 3 4 5 6 7 8 9 10 100 1000 3.14159 -42 1/2 50%",
    "Dogs, cats, horses and rabbits are common domestic animals.",
    "The GPU computes matrix multiplications in parallel very quickly.",
    "Summarize the following article in two sentences, please.",
    "Thank you for your question; here is a step-by-step explanation.",
    "Volcanoes erupt when magma rises through cracks in the Earth's crust.",
    "My favourite colours are red, green, blue, yellow and purple.",
    "The doctor recommended rest, fluids and a follow-up visit next week.",
    "Chess openings include the Sicilian Defence and the Queen's Gambit.",
    "Hello! How are you today? I'm fine, thanks for asking.",
    "[1, 2, 3] + {'key': 'value'} = <tag> | a ~ b ^ c * d / e \\ f",
)

# Llama-style chat template: bos, then each turn as "<|role|>\n{content}{eos}\n".
_LLAMA_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + eos_token + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)


def build_tiny_model(out_dir: Path, arch: TinyArch, *, seed: int = 0) -> Path:
    """Write a small random-weight one-label reward model into ``out_dir``.

    The checkpoint (``config.json``, ``model.safetensors`` and tokenizer files) loads with
    ``AutoTokenizer.from_pretrained`` and ``AutoModelForSequenceClassification``. The same
    ``seed`` always gives byte-identical weights.

    Args:
        out_dir: target directory; created if missing, refused if it exists and is non-empty.
        arch: ``"llama"`` (byte-level BPE, chat template), ``"gpt2"`` (another decoder
            family, with learned absolute positions; the llama tokenizer) or ``"bert"``
            (WordPiece).
        seed: seed for the random weights.

    Returns:
        ``out_dir``.

    Raises:
        ValueError: if ``arch`` is unknown or ``out_dir`` exists and is not empty.
    """
    if arch not in TINY_ARCHS:
        raise ValueError(f"unknown tiny model arch {arch!r}; expected one of {TINY_ARCHS}")
    _prepare_out_dir(out_dir)
    if arch == "llama":
        tokenizer = _llama_tokenizer()
        _save_model(lambda: _llama_model(tokenizer), out_dir, seed)
    elif arch == "gpt2":
        tokenizer = _llama_tokenizer()
        _save_model(lambda: _gpt2_model(tokenizer), out_dir, seed)
    else:
        tokenizer = _bert_tokenizer()
        _save_model(lambda: _bert_model(tokenizer), out_dir, seed)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def _prepare_out_dir(out_dir: Path) -> None:
    # Refuse to write into a populated directory: mixing files from two checkpoints would
    # produce a model that loads but is silently wrong.
    if out_dir.exists():
        if not out_dir.is_dir():
            raise ValueError(f"tiny model target {out_dir} exists and is not a directory")
        if any(out_dir.iterdir()):
            raise ValueError(f"tiny model target {out_dir} exists and is not empty")
    out_dir.mkdir(parents=True, exist_ok=True)


def _llama_tokenizer() -> PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=_VOCAB_SIZE,
        special_tokens=["<pad>", "<s>", "</s>", "<unk>"],
        # Seeding all 256 byte symbols means any text encodes without <unk>.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS, trainer=trainer)
    bos_id = tok.token_to_id("<s>")
    # trim_offsets=False keeps ByteLevel offsets intact; the template adds <s> like Llama.
    tok.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(
                single="<s> $A", pair="<s> $A <s>:1 $B:1", special_tokens=[("<s>", bos_id)]
            ),
        ]
    )
    wrapped = _wrap(
        tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        model_max_length=2048,
    )
    wrapped.chat_template = _LLAMA_CHAT_TEMPLATE
    return wrapped


def _bert_tokenizer() -> PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, models, normalizers, trainers
    from tokenizers.processors import TemplateProcessing

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    # The WordPiece trainer numbers the "##x" continuation pieces in hash-map order, which
    # changes how merge ties break, so plain training gives a different vocab every run.
    # Registering every "##x" up front as a trainer special token pins their ids and makes
    # training deterministic; the vocab is then moved into a fresh tokenizer so that only
    # the real specials are special tokens (a special "##s" would vanish from decodes).
    normalizer = normalizers.BertNormalizer(lowercase=True)
    chars = sorted({c for text in _CORPUS for c in normalizer.normalize_str(text)} - {" "})
    scratch = _bert_pipeline(Tokenizer(models.WordPiece(unk_token="[UNK]")))
    trainer = trainers.WordPieceTrainer(
        vocab_size=_VOCAB_SIZE,
        special_tokens=specials + [f"##{c}" for c in chars],
        show_progress=False,
    )
    scratch.train_from_iterator(_CORPUS, trainer=trainer)
    tok = _bert_pipeline(Tokenizer(models.WordPiece(scratch.get_vocab(), unk_token="[UNK]")))
    tok.add_special_tokens(specials)
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
    )
    return _wrap(
        tok,
        pad_token="[PAD]",
        unk_token="[UNK]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        model_max_length=512,
        # As BERT's own tokenizer: segment ids tell the model where the response starts.
        model_input_names=["input_ids", "token_type_ids", "attention_mask"],
    )


def _bert_pipeline(tok: Any) -> Any:
    """Give a WordPiece ``tokenizers.Tokenizer`` BERT's normaliser, splitting and decoder."""
    from tokenizers import decoders, normalizers, pre_tokenizers

    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece(prefix="##")
    return tok


def _wrap(tok: Any, **special_tokens: Any) -> PreTrainedTokenizerFast:
    from transformers import PreTrainedTokenizerFast

    # The wrapper's __init__ is unannotated (*args, **kwargs), hence the ignore.
    return PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]
        tokenizer_object=tok, **special_tokens
    )


def _shared_config(tokenizer: PreTrainedTokenizerFast) -> dict[str, Any]:
    """What both tiny kinds share: a few small layers and one output, the reward."""
    return {
        "vocab_size": len(tokenizer),
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        # One label means num_labels == 1 (a scalar reward); transformers derives num_labels
        # from id2label, and the typed config signature does not list num_labels itself.
        "id2label": {0: "reward"},
        "label2id": {"reward": 0},
        "pad_token_id": tokenizer.pad_token_id,
    }


def _llama_model(tokenizer: PreTrainedTokenizerFast) -> PreTrainedModel:
    from transformers import LlamaConfig, LlamaForSequenceClassification

    config = LlamaConfig(
        **_shared_config(tokenizer),
        num_key_value_heads=2,
        max_position_embeddings=2048,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return LlamaForSequenceClassification(config)  # type: ignore[no-untyped-call]


def _gpt2_model(tokenizer: PreTrainedTokenizerFast) -> PreTrainedModel:
    from transformers import GPT2Config, GPT2ForSequenceClassification

    shared = _shared_config(tokenizer)
    # GPT-2 names its sizes n_*; the shared sizes, under its names.
    config = GPT2Config(
        vocab_size=shared["vocab_size"],
        n_embd=shared["hidden_size"],
        n_inner=shared["intermediate_size"],
        n_layer=shared["num_hidden_layers"],
        n_head=shared["num_attention_heads"],
        n_positions=2048,
        id2label=shared["id2label"],
        label2id=shared["label2id"],
        pad_token_id=shared["pad_token_id"],
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return GPT2ForSequenceClassification(config)


def _bert_model(tokenizer: PreTrainedTokenizerFast) -> PreTrainedModel:
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(**_shared_config(tokenizer), max_position_embeddings=512)
    return BertForSequenceClassification(config)


def _save_model(make_model: Callable[[], PreTrainedModel], out_dir: Path, seed: int) -> None:
    import torch

    # transformers initialises weights through the global torch RNG, so fork it: the seed
    # then fixes the weights without disturbing the caller's random state. The default dtype
    # is pinned to fp32 so the checkpoint is fp32 whatever the process default is.
    previous_dtype = torch.get_default_dtype()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        torch.set_default_dtype(torch.float32)
        try:
            model = make_model()
        finally:
            torch.set_default_dtype(previous_dtype)
    # transformers >= 4.56 writes model.safetensors by default (5.x has no opt-out), and
    # save_pretrained fills config.architectures from the model class.
    model.save_pretrained(out_dir)
