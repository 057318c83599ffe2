"""Group streamed LLM tokens into clauses the TTS can start speaking at once.

The first clause of a reply is cut early (at a comma once it is long enough) because it decides how
soon the person hears anything; later clauses wait for a sentence end, which sounds more natural.
"""
from __future__ import annotations

import re

_SENTENCE_END = re.compile(r"[.!?…。！？]+[\"')\]]*\s")
_CLAUSE_END = re.compile(r"[,;:—–]\s")
_ABBREVIATIONS = {"mr.", "mrs.", "ms.", "dr.", "prof.", "e.g.", "i.e.", "etc.", "vs.", "st.", "sr.", "jr.", "approx."}


class SentenceAggregator:
    def __init__(self, first_clause_min_chars: int = 24, max_chars: int = 220):
        self.first_clause_min_chars = first_clause_min_chars
        self.max_chars = max_chars
        self._buf = ""
        self._emitted = 0

    def push(self, token: str) -> list[str]:
        self._buf += token
        out: list[str] = []
        while (cut := self._find_cut()) is not None:
            piece, self._buf = self._buf[:cut].strip(), self._buf[cut:].lstrip()
            if piece:
                out.append(piece)
                self._emitted += 1
        return out

    def flush(self) -> list[str]:
        piece, self._buf = self._buf.strip(), ""
        return [piece] if piece else []

    def _find_cut(self) -> int | None:
        end = self._sentence_end()
        if self._emitted == 0:
            # Whichever comes first: a long-enough first clause must not wait for a sentence end
            # that happened to arrive in the same token.
            for m in _CLAUSE_END.finditer(self._buf):
                if m.start() >= self.first_clause_min_chars:
                    if end is None or end < 0 or m.end() < end:  # -1: the buffer ends at an undecided "no."
                        return m.end()
                    break
        if end is not None:
            return end if end >= 0 else None
        if len(self._buf) > self.max_chars:
            space = self._buf.rfind(" ", 0, self.max_chars)
            return space if space > 0 else self.max_chars
        return None

    def _sentence_end(self) -> int | None:
        """Where the first sentence in the buffer ends; -1 while the next token must decide."""
        for m in _SENTENCE_END.finditer(self._buf):
            last_word = self._buf[: m.start() + 1].split()[-1].lower() if self._buf[: m.start() + 1].split() else ""
            if last_word in _ABBREVIATIONS or (len(last_word) == 2 and last_word[0].isalpha() and last_word[1] == "."
                                               and last_word != "i."):
                continue  # "Dr. Smith", "J. Doe": not a sentence end (but "... so do I. Then")
            if last_word == "no.":  # "No. 5" is a number; "I said no. Then" ends a sentence
                following = self._buf[m.end() : m.end() + 1]
                if not following:
                    return -1
                if following.isdigit():
                    continue
            return m.end()
        return None
