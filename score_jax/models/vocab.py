"""Vocabularies: one interface (encode, decode, special ids) over every tokenizer we use.

    vocab = from_gguf("model.gguf")            # SentencePiece (Gemma) or byte-level BPE (SmolLM2)
    vocab = from_tokenizer_json("tokenizer.json")
    vocab = SentencePieceVocab("tokenizer.model")
    ids = ([vocab.bos_id] if vocab.bos_id is not None else []) + vocab.encode(text)

`encode` never adds BOS/EOS; special tokens written in the text (chat markup such as
"<start_of_turn>") become their ids. `decode` drops special tokens.
"""

import abc
import json
import os
import pathlib
import re
from typing import Any, Callable, Iterable, Optional, Sequence, Union

import numpy as np
import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2 as sp_model

from score_jax.models import gguf_file


class Vocabulary(abc.ABC):
  """Text <-> token ids. `eot_id` ends a model turn (the sampler stops on it)."""

  @property
  @abc.abstractmethod
  def vocab_size(self) -> int:
    ...

  @property
  @abc.abstractmethod
  def bos_id(self) -> Optional[int]:
    ...

  @property
  @abc.abstractmethod
  def eos_id(self) -> int:
    ...

  @property
  @abc.abstractmethod
  def pad_id(self) -> int:
    ...

  @property
  def eot_id(self) -> int:
    """End of a model turn; defaults to end of sequence."""
    return self.eos_id

  @abc.abstractmethod
  def encode(self, text: str) -> list[int]:
    """Token ids of `text`, without BOS/EOS."""

  @abc.abstractmethod
  def decode(self, ids: Sequence[int]) -> str:
    """Text of `ids`; special tokens are dropped."""


class CharVocab(Vocabulary):
  """One token per character of a fixed alphabet, plus <pad>=0, <bos>=1, <eos>=2.

  The toy task's vocabulary: tiny, so the demo model trains in minutes on a CPU.
  """

  def __init__(self, alphabet: str):
    if len(set(alphabet)) != len(alphabet):
      raise ValueError("alphabet has repeated characters")
    self._chars = alphabet
    self._index = {c: i + 3 for i, c in enumerate(alphabet)}

  @property
  def vocab_size(self) -> int:
    return len(self._chars) + 3

  @property
  def pad_id(self) -> int:
    return 0

  @property
  def bos_id(self) -> int:
    return 1

  @property
  def eos_id(self) -> int:
    return 2

  def encode(self, text: str) -> list[int]:
    try:
      return [self._index[c] for c in text]
    except KeyError as e:
      raise ValueError(f"character {e.args[0]!r} is not in the vocabulary") from None

  def decode(self, ids: Sequence[int]) -> str:
    return "".join(self._chars[i - 3] for i in ids if 3 <= i < self.vocab_size)


# ---------------------------------------------------------------------------------------------
# Real tokenizers: SentencePiece (Gemma) and byte-level BPE (SmolLM2, Qwen2), from a GGUF file's
# metadata or from the tokenizer files a user brings.

# Tokens that end a model turn, by chat family; the first one a vocabulary has is its `eot_id`.
_TURN_END_TOKENS = ("<end_of_turn>", "<|im_end|>")

# llama.cpp's token types (`tokenizer.ggml.token_type`); the same numbers as SentencePiece's.
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _BYTE = 1, 2, 3, 4, 6


def _gguf_special_tokens(metadata: dict[str, Any]) -> dict[str, str]:
  """{"bos" | "eos" | "unknown" | "padding": token text} for the special ids a GGUF names."""
  tokens = metadata["tokenizer.ggml.tokens"]
  return {name: tokens[metadata[f"tokenizer.ggml.{name}_token_id"]]
          for name in ("bos", "eos", "unknown", "padding")
          if f"tokenizer.ggml.{name}_token_id" in metadata}


def _special_splitter(specials: Iterable[str]) -> Callable[[str], list[str]]:
  """Splits text around special-token strings: even items are plain text, odd ones specials."""
  specials = sorted(specials, key=len, reverse=True)  # Longest first, e.g. "<a>" before "<a".
  if not specials:
    return lambda text: [text]
  pattern = re.compile("(" + "|".join(map(re.escape, specials)) + ")")
  return pattern.split


def _turn_end_id(token_id: Callable[[str], Optional[int]], eos_id: int) -> int:
  for token in _TURN_END_TOKENS:
    if (i := token_id(token)) is not None:
      return i
  return eos_id


class SentencePieceVocab(Vocabulary):
  """A SentencePiece model (Gemma; any `tokenizer.model`).

  Control pieces written in the text (e.g. "<start_of_turn>") encode to their ids, as chat
  templates need; `decode` drops them. User-defined pieces (Gemma's runs of spaces, newlines and
  tabs, HTML tags) are text and are kept. Characters outside the vocabulary fall back to bytes
  when the model has byte pieces (Gemma does). The text between control pieces is encoded piece
  by piece, so a model with a dummy-prefix space (Llama 2; not Gemma) gets one on each.
  """

  def __init__(self, model: Union[str, os.PathLike, bytes], add_bos: bool = True):
    """Args:
      model: path of a `tokenizer.model`, or the serialized `ModelProto` itself.
      add_bos: whether the model expects BOS first; False makes `bos_id` None.
    """
    proto = model if isinstance(model, bytes) else pathlib.Path(model).read_bytes()
    self._sp = spm.SentencePieceProcessor(model_proto=proto)
    if self._sp.eos_id() < 0:
      raise ValueError("the SentencePiece model has no EOS piece")
    self._add_bos = add_bos and self._sp.bos_id() >= 0
    self._control = {self._sp.id_to_piece(i): i
                     for i in range(self._sp.get_piece_size()) if self._sp.is_control(i)}
    self._split = _special_splitter(self._control)
    self._eot = _turn_end_id(self._control.get, self.eos_id)

  @classmethod
  def from_gguf(cls, path: Union[str, os.PathLike]) -> "SentencePieceVocab":
    """The SentencePiece model a GGUF (tokenizer.ggml.model == "llama") describes."""
    metadata = gguf_file.read_metadata(path, _GGUF_TOKENIZER_KEYS)
    return cls(sentencepiece_proto_from_gguf(path, metadata),
               add_bos=metadata.get("tokenizer.ggml.add_bos_token", True))

  @property
  def model_proto(self) -> bytes:
    """The serialized SentencePiece `ModelProto` (what a `tokenizer.model` file holds)."""
    return self._sp.serialized_model_proto()

  @property
  def vocab_size(self) -> int:
    return self._sp.get_piece_size()

  @property
  def bos_id(self) -> Optional[int]:
    """BOS id, or None when the model takes no BOS."""
    return self._sp.bos_id() if self._add_bos else None

  @property
  def eos_id(self) -> int:
    return self._sp.eos_id()

  @property
  def pad_id(self) -> int:
    """The pad piece, or EOS when the model has none (padding is masked anyway)."""
    return self._sp.pad_id() if self._sp.pad_id() >= 0 else self.eos_id

  @property
  def eot_id(self) -> int:
    """"<end_of_turn>" (Gemma) or "<|im_end|>" when the model has it, else EOS."""
    return self._eot

  def encode(self, text: str) -> list[int]:
    ids = []
    for i, part in enumerate(self._split(text)):
      if i % 2:
        ids.append(self._control[part])
      elif part:
        ids.extend(self._sp.encode(part))
    return ids

  def decode(self, ids: Sequence[int]) -> str:
    ids = [int(i) for i in ids]
    if any(not 0 <= i < self.vocab_size for i in ids):
      raise ValueError(f"token id out of range [0, {self.vocab_size})")
    return self._sp.decode(ids)


_GGUF_TOKENIZER_KEYS = frozenset({
    "tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.ggml.tokens",
    "tokenizer.ggml.scores", "tokenizer.ggml.token_type", "tokenizer.ggml.merges",
    "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id",
    "tokenizer.ggml.unknown_token_id", "tokenizer.ggml.padding_token_id",
    "tokenizer.ggml.add_bos_token", "tokenizer.ggml.add_space_prefix",
})


def _tokenizer_metadata(path: Union[str, os.PathLike], model: str, kind: str,
                        metadata: Optional[dict[str, Any]] = None) -> dict[str, Any]:
  """A GGUF file's tokenizer metadata (read unless given); ValueError unless its model is
  `model` (`kind` names it in the message)."""
  if metadata is None:
    metadata = gguf_file.read_metadata(path, _GGUF_TOKENIZER_KEYS)
  if metadata.get("tokenizer.ggml.model") != model:
    raise ValueError(f"{path}: tokenizer {metadata.get('tokenizer.ggml.model')!r} is not "
                     f"{kind} ({model!r})")
  return metadata


def sentencepiece_proto_from_gguf(path: Union[str, os.PathLike],
                                  metadata: Optional[dict[str, Any]] = None) -> bytes:
  """A serialized SentencePiece `ModelProto` (a `tokenizer.model`) rebuilt from a GGUF.

  llama.cpp's "llama" tokenizer is SentencePiece BPE: pieces, scores (merge priority) and types
  come from the file. The normalizer is the identity (Gemma's); a dummy-prefix space is added
  only when the file says so (`add_space_prefix`, default on as in llama.cpp; Gemma: off).
  Pieces stored with real spaces (Gemma's runs of spaces) are respelled with U+2581, since
  SentencePiece matches pieces against text whose spaces are already U+2581.

  Args:
    path: a .gguf file.
    metadata: its tokenizer metadata, when already read.
  """
  metadata = _tokenizer_metadata(path, "llama", "SentencePiece", metadata)
  tokens = metadata["tokenizer.ggml.tokens"]
  scores = metadata["tokenizer.ggml.scores"]
  types = metadata["tokenizer.ggml.token_type"]
  special = _gguf_special_tokens(metadata)
  if "unknown" not in special or "eos" not in special:
    raise ValueError(f"{path}: the GGUF names no unknown or no EOS token")
  proto = sp_model.ModelProto()
  for token, score, token_type in zip(tokens, scores, types):
    piece = proto.pieces.add()
    piece.piece = token if token_type == _CONTROL else token.replace(" ", "\u2581")
    piece.score = float(score)
    # llama.cpp marks the unknown token CONTROL when the HF tokenizer lists it as special.
    piece.type = _UNKNOWN if token == special["unknown"] else int(token_type)
  spec = proto.trainer_spec
  spec.model_type = sp_model.TrainerSpec.BPE
  spec.vocab_size = len(tokens)
  spec.byte_fallback = bool(np.any(types == _BYTE))
  spec.unk_piece, spec.unk_id = special["unknown"], metadata["tokenizer.ggml.unknown_token_id"]
  spec.eos_piece, spec.eos_id = special["eos"], metadata["tokenizer.ggml.eos_token_id"]
  spec.bos_id = spec.pad_id = -1  # -1: the model has none.
  if "bos" in special:
    spec.bos_piece, spec.bos_id = special["bos"], metadata["tokenizer.ggml.bos_token_id"]
  if "padding" in special:
    spec.pad_piece, spec.pad_id = special["padding"], metadata["tokenizer.ggml.padding_token_id"]
  norm = proto.normalizer_spec
  norm.name = "identity"
  norm.add_dummy_prefix = metadata.get("tokenizer.ggml.add_space_prefix", True)
  norm.remove_extra_whitespaces = False
  norm.escape_whitespaces = True
  return proto.SerializeToString()


# How each byte-level BPE family cuts text into words before merging (llama.cpp's
# `tokenizer.ggml.pre` names). The regex split is GPT-2's unless the family has its own.
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_BPE_FAMILIES = ("gpt-2", "smollm", "qwen2")


def _byte_level_pipeline(tokenizer: Any, family: str) -> None:
  """Sets the normalizer, pre-tokenizer and decoder of a byte-level BPE `family`."""
  tokenizers = _import_tokenizers()
  pre = tokenizers.pre_tokenizers
  byte_level = pre.ByteLevel(add_prefix_space=False, use_regex=True)
  if family == "gpt-2":
    tokenizer.pre_tokenizer = byte_level
  elif family == "smollm":  # Every digit alone (as SmolLM2's tokenizer.json does), then GPT-2.
    tokenizer.pre_tokenizer = pre.Sequence([pre.Digits(individual_digits=True), byte_level])
  elif family == "qwen2":
    tokenizer.normalizer = tokenizers.normalizers.NFC()
    tokenizer.pre_tokenizer = pre.Sequence([
        pre.Split(tokenizers.Regex(_QWEN2_SPLIT), behavior="isolated"),
        pre.ByteLevel(add_prefix_space=False, use_regex=False)])
  else:
    raise ValueError(f"byte-level BPE family {family!r} is not supported; "
                     f"supported: {', '.join(_BPE_FAMILIES)}")
  tokenizer.decoder = tokenizers.decoders.ByteLevel()


def _import_tokenizers() -> Any:
  try:
    import tokenizers  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise ImportError("BPE vocabularies need the `tokenizers` package: pip install tokenizers "
                      "(it comes with transformers)") from None
  return tokenizers


class BPEVocab(Vocabulary):
  """A HuggingFace `tokenizers.Tokenizer`: byte-level BPE (SmolLM2, Qwen2) built from a GGUF,
  or whatever a `tokenizer.json` describes.

  Special tokens written in the text (e.g. "<|im_start|>") encode to their ids, as chat
  templates need; `decode` drops them.
  """

  def __init__(self, tokenizer: Any, *, eos_token: str, bos_token: Optional[str] = None,
               pad_token: Optional[str] = None):
    """Args:
      tokenizer: a `tokenizers.Tokenizer`.
      eos_token: the end-of-sequence token.
      bos_token: the token put first in every sequence; None when the model takes none.
      pad_token: the padding token; None pads with EOS.
    """
    self._tokenizer = tokenizer
    self._eos = self._id(eos_token)
    self._bos = None if bos_token is None else self._id(bos_token)
    self._pad = self._eos if pad_token is None else self._id(pad_token)
    self._eot = _turn_end_id(tokenizer.token_to_id, self._eos)

  def _id(self, token: str) -> int:
    token_id = self._tokenizer.token_to_id(token)
    if token_id is None:
      raise ValueError(f"token {token!r} is not in the vocabulary")
    return token_id

  @classmethod
  def from_gguf(cls, path: Union[str, os.PathLike]) -> "BPEVocab":
    """The byte-level BPE a GGUF (tokenizer.ggml.model == "gpt2") describes.

    Tokens the file marks CONTROL become special tokens, USER_DEFINED ones plain added tokens;
    `tokenizer.ggml.pre` picks how text is split before merging (see `_BPE_FAMILIES`).
    """
    tokenizers = _import_tokenizers()
    metadata = _tokenizer_metadata(path, "gpt2", "byte-level BPE")
    tokens = metadata["tokenizer.ggml.tokens"]
    types = metadata["tokenizer.ggml.token_type"]
    alphabet = set(tokenizers.pre_tokenizers.ByteLevel.alphabet())
    for token, token_type in zip(tokens, types):
      if token_type == _NORMAL and not set(token) <= alphabet:
        raise ValueError(f"{path}: token {token!r} is not spelled in the byte-level alphabet")
    if "tokenizer.ggml.merges" not in metadata:
      raise ValueError(f"{path}: the GGUF has no BPE merges")
    merges = [tuple(merge.split(" ")) for merge in metadata["tokenizer.ggml.merges"]]
    if any(len(merge) != 2 for merge in merges):
      raise ValueError(f"{path}: a merge is not two tokens separated by one space")
    vocab = {token: i for i, token in enumerate(tokens)}
    if len(vocab) != len(tokens):
      raise ValueError(f"{path}: the vocabulary has repeated tokens")
    tokenizer = tokenizers.Tokenizer(tokenizers.models.BPE(vocab, merges))
    _byte_level_pipeline(tokenizer, metadata.get("tokenizer.ggml.pre", "gpt-2"))
    tokenizer.add_special_tokens([
        tokenizers.AddedToken(t, special=True, normalized=False)
        for t, token_type in zip(tokens, types) if token_type == _CONTROL])
    tokenizer.add_tokens([
        tokenizers.AddedToken(t, special=False, normalized=False)
        for t, token_type in zip(tokens, types) if token_type == _USER_DEFINED])
    special = _gguf_special_tokens(metadata)
    if "eos" not in special:
      raise ValueError(f"{path}: the GGUF names no EOS token")
    add_bos = metadata.get("tokenizer.ggml.add_bos_token", False)
    return cls(tokenizer, eos_token=special["eos"],
               bos_token=special.get("bos") if add_bos else None,
               pad_token=special.get("padding"))

  @property
  def tokenizer(self) -> Any:
    """The `tokenizers.Tokenizer` (not to be modified)."""
    return self._tokenizer

  @property
  def vocab_size(self) -> int:
    return self._tokenizer.get_vocab_size(with_added_tokens=True)

  @property
  def bos_id(self) -> Optional[int]:
    """BOS id, or None when the model takes no BOS (SmolLM2, Qwen2)."""
    return self._bos

  @property
  def eos_id(self) -> int:
    return self._eos

  @property
  def pad_id(self) -> int:
    return self._pad

  @property
  def eot_id(self) -> int:
    """"<|im_end|>" (ChatML) or "<end_of_turn>" when the vocabulary has it, else EOS."""
    return self._eot

  def encode(self, text: str) -> list[int]:
    return self._tokenizer.encode(text, add_special_tokens=False).ids

  def decode(self, ids: Sequence[int]) -> str:
    ids = [int(i) for i in ids]
    if any(not 0 <= i < self.vocab_size for i in ids):
      raise ValueError(f"token id out of range [0, {self.vocab_size})")
    return self._tokenizer.decode(ids, skip_special_tokens=True)


def from_gguf(path: Union[str, os.PathLike]) -> Vocabulary:
  """The vocabulary of a GGUF model: SentencePiece ("llama") or byte-level BPE ("gpt2")."""
  kind = gguf_file.read_metadata(path, {"tokenizer.ggml.model"}).get("tokenizer.ggml.model")
  if kind == "llama":
    return SentencePieceVocab.from_gguf(path)
  if kind == "gpt2":
    return BPEVocab.from_gguf(path)
  raise ValueError(f"{path}: tokenizer {kind!r} is not supported (SentencePiece 'llama' or "
                   "byte-level BPE 'gpt2')")


def from_tokenizer_json(path: Union[str, os.PathLike], *, eos_token: Optional[str] = None,
                        bos_token: Optional[str] = None,
                        pad_token: Optional[str] = None) -> BPEVocab:
  """A HuggingFace `tokenizer.json` (any model type it describes).

  Special tokens not given here are read from a `tokenizer_config.json` beside the file
  ("eos_token", "bos_token", "pad_token"). BOS is used when that config says
  "add_bos_token": true, or, when it says nothing, when the tokenizer's post-processor puts
  BOS first.
  """
  tokenizers = _import_tokenizers()
  path = pathlib.Path(path)
  tokenizer = tokenizers.Tokenizer.from_file(str(path))
  config_path = path.parent / "tokenizer_config.json"
  config = json.loads(config_path.read_text()) if config_path.exists() else {}
  def configured(name: str) -> Optional[str]:
    token = config.get(name)
    return token.get("content") if isinstance(token, dict) else token
  eos_token = eos_token or configured("eos_token")
  if not eos_token:
    raise ValueError(f"{path}: no EOS token given and none in {config_path}")
  bos_token = bos_token or configured("bos_token")
  if bos_token:
    add_bos = config.get("add_bos_token")
    if add_bos is None:
      first = tokenizer.encode("a", add_special_tokens=True).ids[:1]
      add_bos = first == [tokenizer.token_to_id(bos_token)]
    bos_token = bos_token if add_bos else None
  return BPEVocab(tokenizer, eos_token=eos_token, bos_token=bos_token,
                  pad_token=pad_token or configured("pad_token"))


def to_tokenizers(vocab: Vocabulary) -> Any:
  """`vocab` as a new `tokenizers.Tokenizer` (a tokenizer.json), which encodes as `vocab`
  does and puts BOS first when `vocab.bos_id` is not None.

  A byte-level BPE vocabulary is copied. A SentencePiece BPE model (Gemma) becomes a
  `tokenizers` BPE model with byte fallback on text whose spaces are U+2581: its vocabulary is
  the pieces; its merges are every split of a normal piece into two pieces, ranked by the
  score of the piece they make (SentencePiece merges the adjacent pair that makes the
  highest-scoring piece); control pieces are special tokens and user-defined pieces plain
  added tokens (SentencePiece never merges either).
  """
  tokenizers = _import_tokenizers()
  if isinstance(vocab, BPEVocab):
    tokenizer = tokenizers.Tokenizer.from_str(vocab.tokenizer.to_str())
  elif isinstance(vocab, SentencePieceVocab):
    tokenizer = _sentencepiece_to_tokenizers(vocab.model_proto)
  else:
    raise ValueError(f"a {type(vocab).__name__} has no Hugging Face tokenizer")
  if vocab.bos_id is None:
    tokenizer.post_processor = tokenizers.processors.Sequence([])
  else:
    bos = tokenizer.id_to_token(vocab.bos_id)
    tokenizer.post_processor = tokenizers.processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, vocab.bos_id)])
  return tokenizer


def _sentencepiece_to_tokenizers(model_proto: bytes) -> Any:
  """A SentencePiece BPE model without dummy prefix as a `tokenizers.Tokenizer` (see
  `to_tokenizers`)."""
  tokenizers = _import_tokenizers()
  proto = sp_model.ModelProto.FromString(model_proto)
  if proto.trainer_spec.model_type != sp_model.TrainerSpec.BPE:
    raise ValueError("only SentencePiece BPE models convert to a Hugging Face tokenizer")
  if proto.normalizer_spec.add_dummy_prefix or proto.normalizer_spec.name != "identity":
    raise ValueError("only SentencePiece models with the identity normalizer and no dummy "
                     "prefix (Gemma's) convert to a Hugging Face tokenizer")
  pieces = [(p.piece, p.score, p.type) for p in proto.pieces]
  vocab = {piece: i for i, (piece, _, _) in enumerate(pieces)}
  merges = []  # (-score of the merged piece, left id, right id, left, right)
  for piece, score, piece_type in pieces:
    if piece_type != _NORMAL:
      continue
    for cut in range(1, len(piece)):
      left, right = piece[:cut], piece[cut:]
      if left in vocab and right in vocab:
        merges.append((-score, vocab[left], vocab[right], left, right))
  merges.sort()
  unk = proto.pieces[proto.trainer_spec.unk_id].piece
  tokenizer = tokenizers.Tokenizer(tokenizers.models.BPE(
      vocab, [(left, right) for *_, left, right in merges], unk_token=unk, fuse_unk=True,
      byte_fallback=proto.trainer_spec.byte_fallback))
  tokenizer.normalizer = tokenizers.normalizers.Replace(" ", "\u2581")
  tokenizer.decoder = tokenizers.decoders.Sequence([
      tokenizers.decoders.Replace("\u2581", " "), tokenizers.decoders.ByteFallback(),
      tokenizers.decoders.Fuse()])
  tokenizer.add_special_tokens([
      tokenizers.AddedToken(piece, special=True, normalized=False)
      for piece, _, piece_type in pieces if piece_type in (_CONTROL, _UNKNOWN)])
  tokenizer.add_tokens([
      tokenizers.AddedToken(piece, special=False, normalized=True)
      for piece, _, piece_type in pieces if piece_type == _USER_DEFINED])
  return tokenizer
