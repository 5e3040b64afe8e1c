"""Scrub personal data and secrets from text before it becomes training data.

A model trained on logs can repeat what it saw; an e-mail address or an API key pasted into a
question must never reach the weights. The patterns lean towards over-redacting: a false positive
costs one odd-looking training row, a false negative leaks a credential.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable
from typing import Any

EMAIL = "[EMAIL]"
PHONE = "[PHONE]"
CARD = "[CARD]"
SECRET = "[SECRET]"

_EMAIL = re.compile(r"(?<![\w.+-])[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}")

# Well-known credential shapes; each is unambiguous enough to redact on sight.
_KNOWN_SECRETS = re.compile(
    r"""
      sk-(?:proj-|ant-)?[A-Za-z0-9_-]{16,}                 # OpenAI / Anthropic style keys
    | \b(?:AKIA|ASIA|AGPA|AIDA|AROA)[0-9A-Z]{16}\b         # AWS access key ids
    | \bgh[pousr]_[A-Za-z0-9]{30,}\b                       # GitHub tokens
    | \bgithub_pat_[A-Za-z0-9_]{30,}\b
    | \bxox[abposr]-[A-Za-z0-9-]{10,}                      # Slack tokens
    | \bAIza[0-9A-Za-z_-]{35}\b                            # Google API keys
    | \beyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}  # JWTs
    | -----BEGIN[ A-Z]*PRIVATE\ KEY-----[\s\S]*?-----END[ A-Z]*PRIVATE\ KEY-----
    """,
    re.VERBOSE,
)

# "Authorization: Bearer <token>" and friends: keep the scheme so the sentence still reads.
_BEARER = re.compile(r"(?i)\b(bearer|basic)(\s+)([A-Za-z0-9._~+/=-]{12,})")

# "api_key = ..." / "password: ..." — the value is secret whatever it looks like.
_ASSIGNED = re.compile(
    r"(?i)\b((?:api|access|secret|private)[_-]?key|(?:access|auth|api|refresh)[_-]?token|secret"
    r"|passw(?:or)?d|pwd|client[_-]?secret)"
    # A call on the right-hand side (`password = getpass()`) is code, not a value.
    r"""(["']?\s*[:=]\s*["']?)(?!\[[A-Z]+\])(?![^\s"',;]*\()([^\s"',;]{4,})"""
)

# Long opaque strings: hex digests, base64 blobs. Checked for character mix below so that long
# words and snake_case identifiers survive.
_OPAQUE = re.compile(r"(?<![A-Za-z0-9+/_=-])[A-Za-z0-9+/_-]{32,}={0,2}(?![A-Za-z0-9+/_=-])")
_HEX = re.compile(r"^[0-9a-fA-F]+$")

# A payment card number: 13-19 digits, alone or grouped by single spaces or dashes; Luhn-checked below.
_CARD = re.compile(r"(?<![\w.-])\d(?:[ -]?\d){12,18}(?![\w-])")

# A run of digits with phone-like separators; validated by digit count below.
_PHONE = re.compile(r"(?<![\w.])(?:\+\d{1,3}[\s.-]?)?(?:\(\d{1,4}\)[\s.-]?)?\d{2,4}(?:[\s.-]\d{2,4}){1,4}(?![\w])")


def redact_text(text: str, counts: Counter[str] | None = None) -> str:
    """`text` with e-mails, payment card numbers, phone numbers and secrets replaced by placeholders.

    `counts`, when given, is incremented per kind ("email", "card", "phone", "secret").
    """
    if not text:
        return text
    tally: Counter[str] = counts if counts is not None else Counter()
    text = _sub(_KNOWN_SECRETS, text, lambda m: SECRET, tally, "secret")
    text = _sub(_BEARER, text, lambda m: f"{m.group(1)}{m.group(2)}{SECRET}", tally, "secret")
    text = _sub(_ASSIGNED, text, lambda m: f"{m.group(1)}{m.group(2)}{SECRET}", tally, "secret")
    text = _sub(_EMAIL, text, lambda m: EMAIL, tally, "email")
    text = _sub(_OPAQUE, text, _opaque_replacement, tally, "secret")
    # Before phones: a card number grouped in fours also looks like a (too long) phone number.
    text = _sub(_CARD, text, _card_replacement, tally, "card")
    return _sub(_PHONE, text, _phone_replacement, tally, "phone")


def redact_messages(messages: list[dict[str, Any]], counts: Counter[str] | None = None) -> list[dict[str, Any]]:
    """A copy of chat messages with every string `content` redacted."""
    out = []
    for message in messages:
        content = message.get("content")
        out.append({**message, "content": redact_text(content, counts)} if isinstance(content, str) else dict(message))
    return out


def _sub(
    pattern: re.Pattern[str], text: str, replace: Callable[[re.Match[str]], str | None], tally: Counter[str], kind: str
) -> str:
    def _one(match: re.Match[str]) -> str:
        replacement = replace(match)
        if replacement is None:
            return match.group(0)
        tally[kind] += 1
        return replacement

    return pattern.sub(_one, text)


def _opaque_replacement(match: re.Match[str]) -> str | None:
    token = match.group(0).rstrip("=")
    if _HEX.match(token):
        return SECRET
    has_digit = any(c.isdigit() for c in token)
    has_lower = any(c.islower() for c in token)
    has_upper = any(c.isupper() for c in token)
    # Random base64 of this length nearly always mixes all three; prose and identifiers rarely do.
    return SECRET if has_digit and has_lower and has_upper else None


def _card_replacement(match: re.Match[str]) -> str | None:
    """CARD for a number that passes the Luhn check (as every issued card number does); one in ten random
    digit runs passes too, which is the over-redaction this module prefers to a leak."""
    digits = [int(c) for c in match.group(0) if c.isdigit()]
    total = sum(d if i % 2 == 0 else (d * 2 - 9 if d > 4 else d * 2) for i, d in enumerate(reversed(digits)))
    return CARD if total % 10 == 0 else None


def _phone_replacement(match: re.Match[str]) -> str | None:
    token = match.group(0)
    digits = sum(c.isdigit() for c in token)
    if token.startswith("+"):
        return PHONE if 8 <= digits <= 15 else None
    # Without a country code demand a full national number; shorter digit runs are sizes, years, ranges.
    return PHONE if 10 <= digits <= 15 and not _looks_like_date_or_address(token) else None


def _looks_like_date_or_address(token: str) -> bool:
    return bool(re.fullmatch(r"\d{4}-\d{2}-\d{2}", token) or re.fullmatch(r"\d{1,3}(?:\.\d{1,3}){3}", token))
