"""Semantic end of turn: how much silence ends the turn, given what the person has said so far.

The VAD knows only that the person went quiet; the words say whether they were done. "I led the
billing migration." followed by 250 ms of silence is a finished answer, while "I led the billing
migration and" is a breath before more, however long the pause. This module turns the latest
interim transcript into one of three verdicts and each verdict into an endpoint silence:

- ``COMPLETE`` (sentence punctuation, or a short answer to the agent's question): a short silence;
- ``INCOMPLETE`` (a trailing conjunction, article, filler, comma, "I think that"...): a long one,
  at least the persona's own endpoint;
- ``UNKNOWN`` (no text yet, or no sign either way): a middle one.

The words are read by a word-list heuristic, not a language model: it costs microseconds, needs no
download (LiveKit's ``turn-detector`` plugin fetches its model from the Hugging Face hub at run
time, which these machines cannot do) and its mistakes are easy to read. Its main weakness is
Whisper's habit of ending a fragment with a full stop; the trailing-word lists win over the stop
for that reason. Where the words say neither way, how the speech *sounds* decides when an audio
turn model is installed (``pipeline/turn_model.py``, ``with_audio``): falling pitch and a final
lengthening against a voice held up for more. ``bench/endpointing.py`` measures the false cut-offs
each saves.

Everything here is pure and synchronous: the conversation (``pipeline/conversation.py``) feeds it
text, the segmenter (``pipeline/vad.py``) only ever sees the resulting number of milliseconds.
"""
from __future__ import annotations

import re
import unicodedata
from enum import Enum

from .turns import EndpointingOptions


class Verdict(str, Enum):
    COMPLETE = "complete"
    INCOMPLETE = "incomplete"
    UNKNOWN = "unknown"


# Words after which a sentence cannot end, whatever punctuation Whisper puts after them.
_HARD = {
    "en": "and but or nor because cause cuz um uh uhm umm er erm ah hmm the a an my your our their his her its "
          "of to with from than whether if i we",
    "de": "und aber oder weil dass denn sondern der die das den dem des ein eine einen einem einer eines "
          "ähm äh öhm öh hm mein meine dein deine sein seine unser unsere ihr ihre zu zum zur vom ob wenn als ich",
    "fr": "et mais ou parce que qu qui le la les l un une des du de d au aux euh heu ben hum mon ma mes ton ta tes "
          "son sa ses notre nos votre vos leur leurs je j tu il elle nous vous ils elles car à",
    "es": "y e pero o u porque que el la los las un una unos unas eh em ehm mm mi mis tu tus su sus nuestro nuestra "
          "de del a al con para por cuando si yo",
}
# Words that usually announce more but can close a sentence ("I think so.", "Where are you from?"):
# incomplete only when Whisper did not end the text with sentence punctuation.
_SOFT = {
    "en": "so like then also just well in on at for about into by as that which who when where while since "
          "until unless although though is are was were be been have has had will would can could should",
    "de": "also dann so halt eben mit von für auf in an bei nach über unter weil ist sind war waren hat haben "
          "wird werden kann",
    "fr": "alors donc bon enfin genre puis pour avec dans sur sans chez comme quand est sont était ont va",
    "es": "pues entonces bueno este también en sobre sin como es son era fue tiene va",
}
# Multi-word endings that announce a clause: "I think that", "parce que".
_PHRASES = {
    "en": ["i think", "i think that", "i mean", "i guess", "kind of", "sort of", "such as", "as well as",
           "in order to", "going to", "want to", "have to", "and then", "you know like"],
    "de": ["ich glaube", "ich denke", "ich meine", "so dass", "zum beispiel"],
    "fr": ["je pense", "je pense que", "je crois", "parce que", "c'est", "il y a", "par exemple"],
    "es": ["creo que", "pienso que", "o sea", "es que", "por ejemplo"],
}
# A full stop after these is an abbreviation, not the end of a sentence ("Mr. Quilter").
_ABBREVIATIONS = {
    "en": "mr mrs ms dr st vs etc eg ie prof sr jr",
    "de": "dr hr fr bzw zb usw ca nr",
    "fr": "m mme mlle dr st",
    "es": "sr sra srta dr dra ud uds",
}
# Whole answers to a yes/no question: complete even without punctuation after the agent asked one.
_SHORT_ANSWERS = {
    "en": {"yes", "no", "yeah", "yep", "nope", "sure", "okay", "ok", "right", "correct", "exactly", "of course",
           "not really", "i do", "i don't", "i did", "i didn't", "i am", "i'm not", "definitely", "absolutely"},
    "de": {"ja", "nein", "genau", "klar", "doch", "natürlich", "richtig", "stimmt", "nicht wirklich"},
    "fr": {"oui", "non", "si", "d'accord", "bien sûr", "exactement", "voilà", "pas vraiment"},
    "es": {"sí", "si", "no", "claro", "vale", "exacto", "correcto", "por supuesto", "de acuerdo"},
}
_WORDS = re.compile(r"[^\W_]+(?:['’][^\W_]+)*['’]?")
_END_MARKS = ".?!。？！"
_INCOMPLETE_MARKS = (",", ";", ":", "-", "–", "—", "…", "...")


def _lists(language: str | None) -> str:
    lang = (language or "en").split("-")[0].lower()
    return lang if lang in _HARD else "en"


_HARD_SETS = {k: frozenset(v.split()) for k, v in _HARD.items()}
_SOFT_SETS = {k: frozenset(v.split()) for k, v in _SOFT.items()}
_ABBR_SETS = {k: frozenset(v.split()) for k, v in _ABBREVIATIONS.items()}
_PHRASE_TUPLES = {k: [tuple(p.split()) for p in v] for k, v in _PHRASES.items()}


def words(text: str) -> list[str]:
    """Lower-case words, apostrophes kept inside them ("don't", "l'")."""
    return [w.replace("’", "'") for w in _WORDS.findall(text.lower())]


def classify(text: str | None, language: str | None = "en", *, after_question: bool = False) -> Verdict:
    """What the words so far say about the end of the turn."""
    text = unicodedata.normalize("NFC", text or "").strip().strip('"»«“”')
    ws = words(text)
    if not ws:
        return Verdict.UNKNOWN
    lang = _lists(language)
    last = ws[-1].rstrip("'")
    if last in _HARD_SETS[lang] or ws[-1].endswith("'"):
        return Verdict.INCOMPLETE
    if any(tuple(ws[-len(p):]) == p for p in _PHRASE_TUPLES[lang]):
        return Verdict.INCOMPLETE
    if text.endswith(_INCOMPLETE_MARKS):
        return Verdict.INCOMPLETE
    if text[-1] in _END_MARKS:
        if text[-1] == "." and last in _ABBR_SETS[lang]:
            return Verdict.INCOMPLETE
        return Verdict.COMPLETE
    if after_question and " ".join(ws) in _SHORT_ANSWERS[lang]:
        return Verdict.COMPLETE
    if last in _SOFT_SETS[lang]:
        return Verdict.INCOMPLETE
    return Verdict.UNKNOWN


def with_audio(verdict: Verdict, p_complete: float | None, options: EndpointingOptions) -> Verdict:
    """The words' verdict, corrected by the turn model's P(complete) for the audio (None: no model,
    or no answer yet). Words that announce more always win: a voice can fall on "and"."""
    if p_complete is None or verdict is Verdict.INCOMPLETE:
        return verdict
    if verdict is Verdict.UNKNOWN:
        return Verdict.INCOMPLETE if p_complete < options.audio_incomplete_below else verdict
    return Verdict.UNKNOWN if p_complete < options.audio_veto_below else verdict


def endpoint_ms(verdict: Verdict, options: EndpointingOptions, base_ms: int) -> int:
    """The silence that ends the turn. ``base_ms``: the VAD's own endpoint (the persona's, or the
    server's), which stays the floor of the long wait and the ceiling of the middle one, so a
    persona that asked for patience never gets less of it on an unfinished sentence."""
    if verdict is Verdict.COMPLETE:
        return min(options.complete_silence_ms, base_ms)
    if verdict is Verdict.INCOMPLETE:
        return max(options.incomplete_silence_ms, base_ms)
    return min(options.unknown_silence_ms, base_ms)


def same_words(a: str | None, b: str | None) -> bool:
    """Whether two transcripts say the same words (case, punctuation and spacing aside): the test
    for keeping a reply generated on the interim transcript once the final one is known."""
    return words(a or "") == words(b or "") and bool(words(a or ""))
