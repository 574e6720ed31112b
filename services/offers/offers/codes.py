"""Coupon codes: a pattern over an alphabet without look-alike characters, filled from `secrets`.

`X` in a pattern is one random symbol; anything else (A-Z, 2-9 and '-') is kept as written, so
`"WINE-XXXXX-XXXXX"` gives codes like `WINE-7KQ3M-HX9TD`. A pattern must carry at least
`MIN_BITS` bits of randomness. Codes are read case-insensitively (`normalise`).
"""

from __future__ import annotations

import math
import re
import secrets

# Crockford's base32 without its 0 and 1: no 0/O, 1/I/L look-alikes, and no U (U/V).
ALPHABET = "23456789ABCDEFGHJKMNPQRSTVWXYZ"
BITS_PER_SYMBOL = math.log2(len(ALPHABET))
MIN_BITS = 40
MAX_CODE_LENGTH = 64
DEFAULT_PATTERN = "XXXX-XXXX-XXXX"
_PATTERN = re.compile(rf"[A-Z0-9-]{{1,{MAX_CODE_LENGTH}}}")
_CODE = _PATTERN


def pattern_bits(pattern: str) -> float:
    """The randomness of a code made from `pattern`, in bits."""
    return pattern.count("X") * BITS_PER_SYMBOL


def check_pattern(pattern: str) -> str:
    """The pattern, or ValueError saying what is wrong with it."""
    if not _PATTERN.fullmatch(pattern):
        raise ValueError(
            f"must be 1-{MAX_CODE_LENGTH} characters of A-Z, 0-9 and '-', with X standing for a random symbol"
        )
    bits = pattern_bits(pattern)
    if bits < MIN_BITS:
        need = math.ceil(MIN_BITS / BITS_PER_SYMBOL)
        raise ValueError(
            f"gives {bits:.1f} bits of randomness, at least {MIN_BITS} are needed: use at least {need} X "
            f"(each X is one of {len(ALPHABET)} symbols, {BITS_PER_SYMBOL:.2f} bits)"
        )
    return pattern


def generate(pattern: str) -> str:
    """A fresh code: every X replaced by a symbol drawn from `secrets`.

    One uniform draw below len(ALPHABET) ** count(X), written in that base: the same distribution
    as a `secrets.choice` per symbol, at one system-random call instead of one per symbol (the
    per-symbol draws were a sixth of the offers consumer's time on a batch of purchases)."""
    value = secrets.randbelow(len(ALPHABET) ** pattern.count("X"))
    out = []
    for ch in pattern:
        if ch == "X":
            value, digit = divmod(value, len(ALPHABET))
            out.append(ALPHABET[digit])
        else:
            out.append(ch)
    return "".join(out)


def normalise(code: str) -> str | None:
    """A code as typed (any case, surrounding spaces) as stored, or None when it cannot be one."""
    if not code.isascii():
        return None
    value = code.strip().upper()
    return value if _CODE.fullmatch(value) else None
