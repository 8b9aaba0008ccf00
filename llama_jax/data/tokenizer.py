"""Tokenizers behind one interface: SentencePiece `tokenizer.model` files and Hugging Face `tokenizer.json`.

LLaMA 1 and 2 ship a SentencePiece BPE model (BOS=1, EOS=2, UNK=0, no pad piece, byte fallback, a dummy
leading space); LLaMA 3 and many LLaMA-architecture checkpoints ship a `tokenizer.json` for the Rust
`tokenizers` library. Training, the data pipeline and evaluation only need what `Tokenizer` offers, so
they never care which file a checkpoint came with.

Encoding goes straight to each library (sentencepiece's own leading-space and byte-fallback handling, the
`tokenizers` pipeline stored in the JSON file); BOS/EOS are added here, never by the library, so both
kinds behave the same way.

New tokenizers are trained with LLaMA's SentencePiece settings (`train_sentencepiece`, and the command
line `python train.py tokenizer --data ... --vocab-size N --output PREFIX`). The built-in demo corpus
has its tokenizer trained once per vocabulary size and cached (`builtin_tokenizer`).
"""
from __future__ import annotations

import abc
import functools
import hashlib
import io
import json
import os
import re
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np

from llama_jax.utils.files import tokenizer_files, write_atomically

# The trainer settings stored in LLaMA's tokenizer.model (its ModelProto's trainer_spec and
# normalizer_spec), minus what only depends on the corpus size (input_sentence_size, num_threads).
# "identity" normalisation leaves text untouched; remove_extra_whitespaces=False keeps runs of spaces
# (indentation) as text; byte_fallback spells characters outside the vocabulary as UTF-8 bytes.
LLAMA_SENTENCEPIECE_OPTIONS = dict(
    model_type="bpe",
    character_coverage=0.99995,
    split_digits=True,
    split_by_unicode_script=True,
    split_by_number=True,
    split_by_whitespace=True,
    byte_fallback=True,
    allow_whitespace_only_pieces=True,
    normalization_rule_name="identity",
    remove_extra_whitespaces=False,
    add_dummy_prefix=True,
    max_sentence_length=4192,
    max_sentencepiece_length=16,
    unk_id=0,
    bos_id=1,
    eos_id=2,
    pad_id=-1,
)

# BOS/EOS names to look for in a tokenizer.json that comes without a tokenizer_config.json.
_KNOWN_SPECIAL_PAIRS = (("<s>", "</s>"), ("<|begin_of_text|>", "<|end_of_text|>"))
SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "pad_token")


class TokenizerError(ValueError):
    """A tokenizer file is unreadable, malformed or inconsistent; the message names the file (and field)."""


def read_tokenizer_config(config_path: Path) -> dict:
    """A Hugging Face `tokenizer_config.json` as a dict; bad UTF-8, bad JSON or a non-object is a
    TokenizerError naming the file."""
    try:
        config = json.loads(config_path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as e:
        raise TokenizerError(f"{config_path}: not UTF-8 (byte {e.start})") from None
    except (ValueError, RecursionError) as e:
        raise TokenizerError(f"{config_path}: invalid JSON ({str(e).splitlines()[0] if str(e) else 'too deep'})") from None
    except OSError as e:
        raise TokenizerError(f"{config_path}: unreadable ({e.strerror or e})") from None
    if not isinstance(config, dict):
        raise TokenizerError(f"{config_path}: expected a JSON object, got {type(config).__name__}")
    return config


def read_special_tokens(config_path: Path) -> dict[str, str | None]:
    """{bos_token, eos_token, pad_token: text or None} from a Hugging Face `tokenizer_config.json`."""
    return read_special_tokens_of(read_tokenizer_config(config_path), config_path)


def read_special_tokens_of(config: dict, config_path: Path, keys=SPECIAL_TOKEN_KEYS) -> dict[str, str | None]:
    """{key: text or None} of the special tokens of a tokenizer_config mapping read from `config_path`.

    Each is absent, null, a token string, or an AddedToken object `{"content": "<s>", ...}` (how
    transformers saves them); anything else is a TokenizerError naming the file and the field, never a
    guess: a wrong BOS id would silently shift every sequence.
    """
    tokens = {}
    for key in keys:
        value = config.get(key)
        if isinstance(value, dict):
            if "content" not in value:
                raise TokenizerError(f"{config_path}: {key}: an AddedToken object without \"content\"")
            value = value["content"]
            if value is None:
                raise TokenizerError(f"{config_path}: {key}: an AddedToken object whose \"content\" is null")
        if value is not None and not (isinstance(value, str) and value):
            raise TokenizerError(f"{config_path}: {key}: expected a token string or an object with a "
                                 f"\"content\" string, got {json.dumps(value)[:80]}")
        tokens[key] = value
    return tokens


class Tokenizer(abc.ABC):
    """Text <-> token ids, with the special ids the pipeline and the model need.

    `pad_id` is always a valid id: the file's pad piece where it has one, otherwise `eos_id` (LLaMA's
    SentencePiece model has pad_id = -1). Padding is excluded from the loss and from attention, so which
    real id fills it never matters; a valid one keeps embedding lookups in range.
    """

    def __init__(self, path: str, *, bos_id: int, eos_id: int, pad_id: int | None, vocab_size: int):
        self.path = path
        self.bos_id = bos_id
        self.eos_id = eos_id
        self.declared_pad_id = None if pad_id is None or pad_id < 0 else pad_id  # the file's own, if any
        self.pad_id = eos_id if self.declared_pad_id is None else pad_id
        self.vocab_size = vocab_size

    @property
    @abc.abstractmethod
    def adds_bos(self) -> bool:
        """Whether the tokenizer's own convention puts BOS in front of a text (what transformers'
        default encoding does with the same files): evaluation follows it unless told otherwise."""

    def encode(self, text: str, *, bos: bool = True, eos: bool = False) -> list[int]:
        """Token ids of `text`, with BOS in front and EOS at the end when asked."""
        (ids,) = self.encode_batch([text])
        return [self.bos_id] * bos + ids + [self.eos_id] * eos

    def fingerprint(self) -> str:
        """Content hash of the tokenizer file: caches of token ids are keyed by it."""
        return hashlib.sha256(Path(self.path).read_bytes()).hexdigest()

    @abc.abstractmethod
    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of each text, without BOS/EOS; the library's own multi-threaded batch encoding."""

    @abc.abstractmethod
    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids`; BOS, EOS and pad ids decode to nothing."""

    @abc.abstractmethod
    def _token_end_offsets(self, text: str) -> tuple[list[int], np.ndarray]:
        """Token ids of `text` (no BOS/EOS) and, for each, the UTF-8 byte offset in `text` where its span ends."""

    def encode_with_byte_counts(self, text: str) -> tuple[list[int], np.ndarray]:
        """Token ids of `text` (no BOS/EOS) and how many bytes of `text` each token accounts for.

        Every byte of `text` is credited to the first token whose reported span reaches past it, so the
        counts sum to exactly `len(text.encode())` (bits-per-byte needs that exactness): a character
        split over several byte-fallback tokens counts once, for one of them; the dummy leading space
        SentencePiece inserts is not text and counts for nothing; trailing bytes a tokenizer dropped
        are credited to the last token.
        """
        ids, ends = self._token_end_offsets(text)
        reach = np.maximum.accumulate(ends) if len(ends) else ends
        counts = np.diff(reach, prepend=0).astype(np.int32)
        if len(counts):
            counts[-1] += len(text.encode("utf-8")) - int(reach[-1])
        return ids, counts


    @abc.abstractmethod
    def token_text(self, token_id: int) -> str:
        """The vocabulary entry of `token_id` ("<s>", "<|eot_id|>"): how chat templates write special tokens."""

    def encode_chat_text(self, text: str) -> tuple[list[int], np.ndarray]:
        """Token ids of rendered chat text, in which special tokens written out ("<s>", "<|eot_id|>") stand
        for themselves, and each token's UTF-8 byte end offset in `text` (to map template spans to tokens).

        The `tokenizers` library finds a tokenizer.json's special tokens in text itself.
        """
        return self._token_end_offsets(text)


# A line of a tiktoken BPE file: a token's bytes in base64, a space, its rank.
_TIKTOKEN_LINE = re.compile(rb"[A-Za-z0-9+/]+={0,2} [0-9]+\r?\n")


def _is_tiktoken(path: str) -> bool:
    """Whether `path` starts like a tiktoken BPE file (LLaMA 3's Meta `tokenizer.model`)."""
    try:
        with open(path, "rb") as f:
            head = f.read(256)
    except OSError:
        return False
    return _TIKTOKEN_LINE.match(head) is not None


class SentencePieceTokenizer(Tokenizer):
    """A SentencePiece `.model` file (LLaMA 1/2's own, or one made by `train_sentencepiece`)."""

    def __init__(self, path: str):
        import sentencepiece as spm

        try:
            self._sp = spm.SentencePieceProcessor(model_file=path)
        except (RuntimeError, OSError) as e:
            if _is_tiktoken(path):
                raise TokenizerError(f"{path}: a tiktoken BPE file (Meta's LLaMA 3 release), which llama_jax does not "
                                     f"read: use the Hugging Face release's tokenizer.json (with its "
                                     f"tokenizer_config.json) instead") from None
            raise TokenizerError(f"{path}: not a SentencePiece model ({e})") from e
        super().__init__(path, bos_id=self._sp.bos_id(), eos_id=self._sp.eos_id(), pad_id=self._sp.pad_id(),
                         vocab_size=self._sp.vocab_size())
        if self.bos_id < 0 or self.eos_id < 0:
            raise TokenizerError(f"{path}: the SentencePiece model has no BOS or EOS piece "
                             f"(bos_id={self.bos_id}, eos_id={self.eos_id})")

    @functools.cached_property
    def adds_bos(self) -> bool:
        """`add_bos_token` of the tokenizer_config.json beside the model where it says; else True, LLaMA's
        convention (Meta's code, and every LLaMA SentencePiece repository's `add_bos_token: true`)."""
        config_path = Path(self.path).with_name("tokenizer_config.json")
        value = read_tokenizer_config(config_path).get("add_bos_token") if config_path.is_file() else None
        if value is not None and not isinstance(value, bool):
            raise TokenizerError(f"{config_path}: add_bos_token: expected true or false, got {json.dumps(value)[:80]}")
        return True if value is None else value

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return self._sp.encode(list(texts), num_threads=os.cpu_count())

    def decode(self, ids: Iterable[int]) -> str:
        return self._sp.decode([int(i) for i in ids])

    def _token_end_offsets(self, text: str) -> tuple[list[int], np.ndarray]:
        pieces = self._sp.encode(text, return_type="proto").pieces
        return [p.id for p in pieces], np.array([p.end for p in pieces], dtype=np.int64)

    def token_text(self, token_id: int) -> str:
        return self._sp.id_to_piece(int(token_id))

    def encode_chat_text(self, text: str) -> tuple[list[int], np.ndarray]:
        """SentencePiece would spell "<s>" out as characters: the text is cut at BOS/EOS strings and the
        pieces between them encoded one by one, each with its dummy prefix (as Meta's chat code does),
        except that a piece starting with a space takes that space as its prefix: the rule of transformers'
        LLaMA tokenizer (Metaspace prepends `▁` only where there is none), which Meta's own code never
        meets (its pieces start with "[INST]")."""
        specials = {self.token_text(i): i for i in (self.bos_id, self.eos_id)}
        ids, ends, done = [], [], 0
        for part in re.split("(" + "|".join(map(re.escape, specials)) + ")", text):
            if part in specials:
                part_ids, part_ends = [specials[part]], np.array([len(part.encode("utf-8"))])
            elif part == " ":
                part_ids, part_ends = [self._sp.piece_to_id("\u2581")], np.array([1])
            elif part.startswith(" "):
                part_ids, part_ends = self._token_end_offsets(part[1:])
                part_ends = np.asarray(part_ends) + 1
            elif part:
                part_ids, part_ends = self._token_end_offsets(part)
            else:
                continue
            ids += part_ids
            ends.append(np.asarray(part_ends, np.int64) + done)
            done += len(part.encode("utf-8"))
        return ids, np.concatenate(ends) if ends else np.zeros(0, np.int64)


class HuggingFaceTokenizer(Tokenizer):
    """A Hugging Face `tokenizer.json`, read by the `tokenizers` library.

    BOS/EOS/pad come from the `tokenizer_config.json` beside it (`bos_token`, `eos_token`, `pad_token`),
    or, without one, from the well-known LLaMA names (`<s>`/`</s>`, `<|begin_of_text|>`/`<|end_of_text|>`).
    """

    def __init__(self, path: str):
        import tokenizers

        try:
            self._tok = tokenizers.Tokenizer.from_file(path)
        except Exception as e:  # the Rust library raises a bare Exception for unreadable files
            raise TokenizerError(f"{path}: not a Hugging Face tokenizer.json ({e})") from e
        source, (bos, eos, pad) = self._special_tokens(path)
        token_id = functools.partial(self._token_id, source, Path(path).name)
        super().__init__(path, bos_id=token_id(bos, "bos_token"), eos_id=token_id(eos, "eos_token"),
                         pad_id=None if pad is None else token_id(pad, "pad_token"),
                         vocab_size=self._tok.get_vocab_size(with_added_tokens=True))

    def _special_tokens(self, path: str) -> tuple[str, tuple[str, str, str | None]]:
        """(the file that named them, (bos, eos, pad)): tokenizer_config.json when it names BOS and EOS,
        else LLaMA's well-known names in the vocabulary."""
        config_path = Path(path).with_name("tokenizer_config.json")
        if config_path.exists():
            tokens = read_special_tokens(config_path)
            if tokens["bos_token"] and tokens["eos_token"]:
                return str(config_path), tuple(tokens[key] for key in SPECIAL_TOKEN_KEYS)
        for bos, eos in _KNOWN_SPECIAL_PAIRS:
            if self._tok.token_to_id(bos) is not None and self._tok.token_to_id(eos) is not None:
                return path, (bos, eos, None)
        raise TokenizerError(f"{path}: cannot tell its BOS/EOS tokens: put a tokenizer_config.json with "
                             f"bos_token and eos_token next to it")

    def _token_id(self, source: str, vocabulary: str, token: str, key: str) -> int:
        token_id = self._tok.token_to_id(token)
        if token_id is None:
            raise TokenizerError(f"{source}: {key} {token!r} is not in the vocabulary of {vocabulary}")
        return token_id

    @functools.cached_property
    def adds_bos(self) -> bool:
        """Whether the file's post-processor puts BOS in front (LLaMA 3's does; many others do not)."""
        plain, special = (self._tok.encode("a", add_special_tokens=flag).ids for flag in (False, True))
        return special[:1] == [self.bos_id] and special[1:len(plain) + 1] == plain

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        special = {self.bos_id, self.eos_id, self.pad_id}
        return self._tok.decode([int(i) for i in ids if int(i) not in special], skip_special_tokens=True)

    def _token_end_offsets(self, text: str) -> tuple[list[int], np.ndarray]:
        encoding = self._tok.encode(text, add_special_tokens=False)
        # `tokenizers` reports offsets in characters; turn them into UTF-8 byte offsets.
        codepoints = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
        char_bytes = 1 + (codepoints >= 0x80) + (codepoints >= 0x800) + (codepoints >= 0x10000)
        byte_at_char = np.concatenate([[0], np.cumsum(char_bytes)])
        char_ends = np.array([end for _, end in encoding.offsets], dtype=np.int64)
        return encoding.ids, byte_at_char[char_ends]

    def token_text(self, token_id: int) -> str:
        return self._tok.id_to_token(int(token_id))


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """Load a `.model` (SentencePiece) or `.json` (Hugging Face) file, or a directory holding one.

    A directory with both (Hugging Face LLaMA 2 repositories) gives the original `tokenizer.model`.
    """
    p = Path(path)
    if p.is_dir():
        found = tokenizer_files(p)
        if not found:
            raise FileNotFoundError(f"{p}: directory has neither tokenizer.model nor tokenizer.json")
        p = found[0]
    if not p.is_file():
        raise FileNotFoundError(f"tokenizer file {p} does not exist")
    if p.suffix == ".json":
        return HuggingFaceTokenizer(str(p))
    return SentencePieceTokenizer(str(p))


def check_vocab_size(tokenizer: Tokenizer, model_vocab_size: int) -> None:
    """Refuse a tokenizer whose ids do not match the model's embedding table, before anything compiles."""
    if tokenizer.vocab_size != model_vocab_size:
        raise ValueError(f"tokenizer {tokenizer.path} has vocab_size {tokenizer.vocab_size} but the model's "
                         f"vocab_size is {model_vocab_size}: use the checkpoint's own tokenizer or set the "
                         f"model's vocab_size to {tokenizer.vocab_size}")


def _lines(files: Sequence[str]) -> Iterator[str]:
    """SentencePiece trains on sentences; like its own file reader, we feed one line at a time."""
    for f in files:
        with open(f, encoding="utf-8") as fh:
            try:
                for line in fh:
                    yield line.rstrip("\n")
            except UnicodeDecodeError as e:
                raise ValueError(f"{f}: not UTF-8 text ({e})") from e


def train_sentencepiece(files: Sequence[str], vocab_size: int, output_prefix: str, *,
                        input_sentence_size: int = 0, num_threads: int | None = None) -> str:
    """Train a SentencePiece BPE model with LLaMA's settings; returns the path of `output_prefix.model`.

    Deterministic: the same files give the same model bytes (no absolute paths are stored in it, and
    with input_sentence_size=0 every line is used, so no sampling). A `.vocab` text file is written
    beside the model for inspection. Both files appear atomically.
    """
    import sentencepiece as spm
    from sentencepiece import sentencepiece_model_pb2

    if vocab_size < 260:
        raise ValueError(f"vocab_size must be at least 260 (3 specials + 256 byte-fallback pieces + 1), "
                         f"got {vocab_size}")
    missing = [f for f in files if not Path(f).is_file()]
    if not files or missing:
        raise FileNotFoundError(f"tokenizer training data: no such file {missing[0]}" if missing
                                else "tokenizer training data: no files given")
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(sentence_iterator=_lines(files), model_writer=model,
                                       vocab_size=vocab_size, input_sentence_size=input_sentence_size,
                                       num_threads=num_threads or os.cpu_count(), minloglevel=2,
                                       **LLAMA_SENTENCEPIECE_OPTIONS)
    except RuntimeError as e:
        raise ValueError(f"SentencePiece training on {len(files)} file(s) failed: {e}") from e
    out = Path(f"{output_prefix}.model")
    write_atomically(out, model.getvalue())
    proto = sentencepiece_model_pb2.ModelProto.FromString(model.getvalue())
    vocab_lines = "".join(f"{p.piece}\t{p.score:g}\n" for p in proto.pieces)
    write_atomically(Path(f"{output_prefix}.vocab"), vocab_lines.encode("utf-8"))
    return str(out)


def builtin_tokenizer(vocab_size: int, cache_dir: str) -> Tokenizer:
    """The tokenizer of the built-in demo corpus (see `llama_jax.data.corpus`), trained once and cached.

    The file name holds the vocabulary size and a fingerprint of the corpus (Python version, file names
    and sizes), so another interpreter or vocabulary gets its own file. Two processes racing to train it
    both write the same bytes through a rename, so neither reads a partial file.
    """
    from llama_jax.data import corpus

    path = Path(cache_dir) / f"builtin-{corpus.fingerprint('train')[:16]}-v{vocab_size}.model"
    if not path.is_file():
        files = [str(f) for f in corpus.builtin_files("train")]
        train_sentencepiece(files, vocab_size, str(path.with_suffix("")))
    return load_tokenizer(path)
