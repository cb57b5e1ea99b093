"""Validation of operator instructions before they reach the VLM.

An instruction is free text from the network: it must be refused (with a reason) when it is
empty, absurdly long, or carries control / undecodable characters, and never crash a node.
"""

from __future__ import annotations

import unicodedata

DEFAULT_MAX_BYTES = 2048


class InstructionError(ValueError):
    """The instruction was refused; the message says why."""


def clean_instruction(text: object, *, max_bytes: int = DEFAULT_MAX_BYTES) -> str:
    """Return the normalised instruction or raise InstructionError."""
    if not isinstance(text, str):
        raise InstructionError(f"instruction must be text, got {type(text).__name__}")
    encoded_len = len(text.encode("utf-8", errors="surrogatepass"))
    if encoded_len > max_bytes:
        raise InstructionError(f"instruction is {encoded_len} bytes, more than the limit of {max_bytes}")
    if "\ufffd" in text or any(0xD800 <= ord(c) <= 0xDFFF for c in text):
        raise InstructionError("instruction contains undecodable (replacement / surrogate) characters")
    bad = [c for c in text if unicodedata.category(c) in ("Cc", "Cf", "Co", "Cn") and c not in "\t\n\r"]
    if bad:
        raise InstructionError(f"instruction contains {len(bad)} control or unassigned character(s), e.g. {bad[0]!r}")
    cleaned = " ".join(unicodedata.normalize("NFC", text).split())
    if not cleaned:
        raise InstructionError("instruction is empty or whitespace only")
    return cleaned
