"""ELMo character ids: the byte-level input of the ELMo character CNN.

Every word becomes one row of ``MAX_WORD_LENGTH`` (50) integer ids, laid out the
way the original biLM (bilm-tf) and AllenNLP's ``ELMoCharacterMapper`` lay it out:

* the word is UTF-8 encoded (bytes that cannot be encoded are dropped) and cut to
  48 bytes (50 minus the begin/end-of-word markers), even in the middle of a
  multi-byte character;
* position 0 holds the begin-of-word marker, then come the bytes, then the
  end-of-word marker, and the rest is padding;
* finally every id is shifted by +1, so that id 0 is free for *padding tokens*.

After the shift the markers are: begin-of-word 259, end-of-word 260, padding
character 261, and a byte ``b`` becomes ``b + 1``. The sentence boundary tokens
``<S>`` and ``</S>`` use the special characters 256 and 257 (257 and 258 after the
shift) between the word markers.

Padding *tokens* (positions past the end of a sentence in a padded batch) are
rows of zeros. This module never produces them; batching code pads with
``np.zeros`` and the encoder treats an all-zero row as "no token".

The encoder (``spacy_ctx.encoders.elmo``) takes tensors only and knows nothing of
this module: the ELMo backend (``spacy_ctx.backends.elmo``) maps words to char ids
here and frames every sentence with ``BOS_TOKEN`` ... ``EOS_TOKEN`` itself.

This module depends on numpy only.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

__all__ = [
    "MAX_WORD_LENGTH",
    "BEGINNING_OF_SENTENCE_CHAR",
    "END_OF_SENTENCE_CHAR",
    "BEGINNING_OF_WORD_CHAR",
    "END_OF_WORD_CHAR",
    "PADDING_CHAR",
    "BOS_TOKEN",
    "EOS_TOKEN",
    "BOS_CHAR_IDS",
    "EOS_CHAR_IDS",
    "PADDING_TOKEN_ID",
    "word_char_ids",
    "elmo_char_ids",
]

#: Number of character ids per word, markers included.
MAX_WORD_LENGTH = 50

# Raw character codes before the +1 shift (0..255 are UTF-8 bytes).
BEGINNING_OF_SENTENCE_CHAR = 256
END_OF_SENTENCE_CHAR = 257
BEGINNING_OF_WORD_CHAR = 258
END_OF_WORD_CHAR = 259
PADDING_CHAR = 260

#: The strings ELMo uses for the sentence boundary tokens.
BOS_TOKEN = "<S>"
EOS_TOKEN = "</S>"

#: Every id in a padding token's row (after the shift there is no real char 0).
PADDING_TOKEN_ID = 0


def _special_token_ids(character: int) -> np.ndarray:
    """Char ids (shifted) of a sentence boundary token built around ``character``."""
    ids = np.full(MAX_WORD_LENGTH, PADDING_CHAR, dtype=np.int64)
    ids[0] = BEGINNING_OF_WORD_CHAR
    ids[1] = character
    ids[2] = END_OF_WORD_CHAR
    ids += 1
    ids.setflags(write=False)  # shared constant: callers must copy before editing
    return ids


#: Char ids of the sentence start token ``<S>``, shape (50,), already shifted.
BOS_CHAR_IDS: np.ndarray = _special_token_ids(BEGINNING_OF_SENTENCE_CHAR)
#: Char ids of the sentence end token ``</S>``, shape (50,), already shifted.
EOS_CHAR_IDS: np.ndarray = _special_token_ids(END_OF_SENTENCE_CHAR)


def word_char_ids(word: str, out: np.ndarray | None = None) -> np.ndarray:
    """Return the (50,) int64 char ids of one word, written into ``out`` if given.

    As in bilm-tf and AllenNLP, the literal strings ``"<S>"`` and ``"</S>"`` map to
    the sentence boundary ids rather than to their bytes.
    """
    if out is None:
        out = np.empty(MAX_WORD_LENGTH, dtype=np.int64)
    if word == BOS_TOKEN:
        out[:] = BOS_CHAR_IDS
        return out
    if word == EOS_TOKEN:
        out[:] = EOS_CHAR_IDS
        return out
    encoded = word.encode("utf-8", "ignore")[: MAX_WORD_LENGTH - 2]
    n_bytes = len(encoded)
    out[:] = PADDING_CHAR + 1
    out[0] = BEGINNING_OF_WORD_CHAR + 1
    out[1 : n_bytes + 1] = np.frombuffer(encoded, dtype=np.uint8)
    out[1 : n_bytes + 1] += 1
    out[n_bytes + 1] = END_OF_WORD_CHAR + 1
    return out


def elmo_char_ids(words: Sequence[str]) -> np.ndarray:
    """Map words to ELMo character ids, one row per word.

    Args:
        words: the tokens of one sentence (or any list of words).

    Returns:
        An int64 array of shape ``(len(words), 50)``; see the module docstring for
        the layout. Every row is a real word (no all-zero padding rows).
    """
    result = np.empty((len(words), MAX_WORD_LENGTH), dtype=np.int64)
    for row, word in enumerate(words):
        word_char_ids(word, out=result[row])
    return result
