"""Validation of operator instructions before they reach the VLM.

An instruction is free text from the network: it must be refused (with a reason) when it is
empty, absurdly long, carries control / undecodable characters, or has no word in it at all,
and never crash a node. Every refusal is an ``InstructionError`` whose message starts with a
short code (``not_text``, ``too_long``, ``undecodable``, ``control_chars``, ``empty``,
``no_words``; ``unknown_colour``, ``no_known_object`` from ``check_names_known_colours``) that
nodes count rejections by.
"""

from __future__ import annotations

import re
import unicodedata

DEFAULT_MAX_BYTES = 2048

NOT_TEXT, TOO_LONG, UNDECODABLE, CONTROL_CHARS, EMPTY, NO_WORDS = (
    "not_text", "too_long", "undecodable", "control_chars", "empty", "no_words")
UNKNOWN_COLOUR, NO_KNOWN_OBJECT = "unknown_colour", "no_known_object"
# Colour words an operator may use; one the scene's objects do not have names an object that is not there.
COLOUR_WORDS = frozenset({"black", "white", "red", "green", "yellow", "blue", "brown", "purple", "pink", "orange",
                          "grey", "gray", "violet", "cyan", "magenta", "teal", "turquoise", "gold", "silver",
                          "beige", "maroon", "navy", "lime", "indigo"})


class InstructionError(ValueError):
    """The instruction was refused; ``code`` names the kind, the message says why."""

    def __init__(self, code: str, detail: str) -> None:
        super().__init__(f"{code}: {detail}")
        self.code = code


def clean_instruction(text: object, *, max_bytes: int = DEFAULT_MAX_BYTES) -> str:
    """Return the normalised instruction (NFC, single spaces) or raise InstructionError."""
    if not isinstance(text, str):
        raise InstructionError(NOT_TEXT, f"instruction must be text, got {type(text).__name__}")
    if len(text) > max_bytes:  # each character is >= 1 byte: refuse huge inputs before encoding them
        raise InstructionError(TOO_LONG, f"instruction has {len(text)} characters, more than the limit of "
                                         f"{max_bytes} bytes")
    encoded_len = len(text.encode("utf-8", errors="surrogatepass"))
    if encoded_len > max_bytes:
        raise InstructionError(TOO_LONG, f"instruction is {encoded_len} bytes, more than the limit of {max_bytes}")
    if "\ufffd" in text or any(0xD800 <= ord(c) <= 0xDFFF for c in text):
        raise InstructionError(UNDECODABLE, "instruction contains undecodable (replacement / surrogate) characters: "
                                            "it was not valid UTF-8")
    bad = [c for c in text if unicodedata.category(c) in ("Cc", "Cf", "Co", "Cn") and c not in "\t\n\r"]
    if bad:
        raise InstructionError(CONTROL_CHARS, f"instruction contains {len(bad)} control or unassigned "
                                              f"character(s), e.g. {bad[0]!r}")
    cleaned = " ".join(unicodedata.normalize("NFC", text).split())
    if not cleaned:
        raise InstructionError(EMPTY, "instruction is empty or whitespace only")
    if len(cleaned.encode("utf-8")) > max_bytes:  # NFC can expand a few characters (composition exclusions)
        raise InstructionError(TOO_LONG, f"instruction is more than {max_bytes} bytes once normalised")
    if not any(c.isalnum() for c in cleaned):
        raise InstructionError(NO_WORDS, f"instruction {cleaned[:40]!r} has no letter or digit")
    return cleaned


def check_names_known_colours(instruction: str, known: set[str] | frozenset[str]) -> None:
    """Raise InstructionError unless ``instruction`` names an object by one of the ``known`` colours
    and no other colour.

    An object reader picks the best-scoring object for any text, so "stop" or "pick up the purple
    cube" in a scene without purple would still yield a position, and the arm would move to it.
    """
    words = set(re.findall(r"[a-z]+", instruction.lower()))
    known = {colour.lower() for colour in known}
    unknown = sorted((words & COLOUR_WORDS) - known)
    if unknown:
        raise InstructionError(UNKNOWN_COLOUR, f"instruction names {', '.join(unknown)}; the objects here are "
                                               f"{', '.join(sorted(known))}")
    if not words & known:
        raise InstructionError(NO_KNOWN_OBJECT, f"instruction {instruction[:60]!r} names no object by colour "
                                                f"({', '.join(sorted(known))}): nothing to act on")
