"""Tiny tokenizer directories for the fine-tuning tests, built here (nothing downloaded): a byte-level BPE
`tokenizer.json` with LLaMA 3's or LLaMA 2's special tokens, and its `tokenizer_config.json` holding a chat
template, so transformers' `AutoTokenizer` and our `load_tokenizer` read the very same files."""
from __future__ import annotations

import json
from pathlib import Path

LLAMA3_SPECIALS = ("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")
LLAMA2_SPECIALS = ("<unk>", "<s>", "</s>")
TRAINING_TEXT = ["Hello there, how are you? I am fine, thanks. Reverse these words: apple banana cherry.",
                 "Below is an instruction that describes a task. ### Instruction: ### Response: [INST] [/INST]",
                 "<<SYS>> You are terse. <</SYS>> Add 12 and 30: 42. Ünïcödé ok."]


def make_tokenizer_dir(directory: Path, specials: tuple[str, ...], chat_template: str | None,
                       vocab_size: int = 320) -> Path:
    """Train a byte-level BPE on a few sentences with `specials` as special tokens; write both files."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(specials),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(TRAINING_TEXT * 5, trainer)
    directory.mkdir(parents=True, exist_ok=True)
    tok.save(str(directory / "tokenizer.json"))
    bos, eos = (specials[0], specials[1]) if specials == LLAMA3_SPECIALS else ("<s>", "</s>")
    config = {"bos_token": bos, "eos_token": eos, "tokenizer_class": "PreTrainedTokenizerFast"}
    if chat_template is not None:
        config["chat_template"] = chat_template
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    return directory
