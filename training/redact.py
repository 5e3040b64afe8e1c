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
IBAN = "[IBAN]"
SECRET = "[SECRET]"

# The local part is ASCII or its full-width form (＠ and ． too, as East Asian input methods type them); the
# domain may be internationalised (例え.jp). Both stay narrow on purpose: a `\w` local part would swallow the
# CJK words written right before an address. Full-width ASCII is U+FF01-FF5E less ＠ (U+FF20).
_EMAIL = re.compile(
    r"(?<![\w.+-])[A-Za-z0-9._%+\-\uFF01-\uFF1F\uFF21-\uFF5E]+[@\uFF20][\w-]+(?:[.\uFF0E][\w-]+)*"
    r"[.\uFF0E][A-Za-z\uFF21-\uFF3A\uFF41-\uFF5A]{2,}"
)

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

# The credential in an Authorization header, whatever its scheme (Token, Bearer, Basic, ...) and length: the
# header names it a credential. The header name and scheme are kept so the sentence still reads. Templates
# (`$TOKEN`, `{token}`, `<token>`) are not credentials, and neither is a bare scheme word (`"Bearer " + t`).
_AUTH_HEADER = re.compile(
    r"""(?i)(?<![\w-])((?:proxy-)?authorization["']?\s*[:=]\s*["']?"""
    r"(?:(?:bearer|basic|token|digest|bot|apikey|key|negotiate|ntlm)\s+)?)"
    r"""(?![$<{\[])(?!(?:bearer|basic|token|digest)\b)(?![^\s"',;]*[(\[])([^\s"',;)}\]]+)"""
)

# "Bearer <token>" outside a header: 12+ characters, or 6+ that mix letters and digits (`Bearer abc123`);
# "bearer bonds" and "Basic authentication" are prose. "Token <value>" (the header's value quoted alone) only
# for 12+ characters mixing letters and digits: "token" is an everyday word in LLM text.
_BEARER = re.compile(r"(?i)\b(bearer|basic|token)(\s+)([A-Za-z0-9._~+/=-]{6,})")

# "api_key = ..." / "password: ..." — the value is secret whatever it looks like.
_ASSIGNED = re.compile(
    r"(?i)\b((?:api|access|secret|private)[_-]?key|(?:access|auth|api|refresh)[_-]?token|secret"
    r"|passw(?:or)?d|pwd|client[_-]?secret)"
    # A call on the right-hand side (`password = getpass()`) is code, not a value.
    r"""(["']?\s*[:=]\s*["']?)(?!\[[A-Z]+\])(?![^\s"',;]*\()([^\s"',;]{4,})"""
)

# Generic credential names, too common in code to redact on the name alone (`key=len`, `token = tokens[0]`).
# In a URL query (`?key=...`, `&X-Amz-Signature=...`) any value is a credential; elsewhere only a value that
# looks like one: 8+ token characters mixing letters and digits (see _param_replacement). `(?<![\w-])` keeps
# `sort_key` / `x-api-key` to the patterns above.
_PARAM = re.compile(
    r"(?i)(?<![\w-])(x-amz-(?:signature|credential|security-token)|x-goog-(?:signature|credential)|token|key"
    r"|apikey|sig|signature)"
    r"""(["']?\s*[:=]\s*["']?)(?!\[[A-Z]+\])(?![^\s"',;&#]*\()([^\s"',;&#]{4,})"""
)
_TOKEN_CHARS = re.compile(r"[A-Za-z0-9._~+/-]+=*")

# The password in a URL (`postgres://admin:s3cret@localhost/db`), whatever the host: keep the user name.
# Anchored on "://", as store.logs' rule: a scheme pattern tried at every word start rescans dotted text (quadratic).
_URL_PASSWORD = re.compile(r"(://[^\s/@:]*:)(?![$<{\[])([^\s/@]+)(?=@)")

# "my password is hunter2": only a value that mixes letters and digits, or one in quotes, so that "the password
# is required" and "password is too short" stay.
_PASSWORD_IS = re.compile(
    r"(?i)\b(pass(?:word|phrase)|passwd|pwd)(\s+(?:is|was)\s*:?\s+)(?!\[[A-Z]+\])"
    r"""(["'`]?)([^\s"'`]{4,}?)(["'`]?)(?=[.,;:!?)]*(?:\s|$))"""
)

# Long opaque strings: hex digests, base64 blobs. Checked for character mix below so that long
# words and snake_case identifiers survive.
_OPAQUE = re.compile(r"(?<![A-Za-z0-9+/_=-])[A-Za-z0-9+/_-]{32,}={0,2}(?![A-Za-z0-9+/_=-])")
_HEX = re.compile(r"^[0-9a-fA-F]+$")

# An IBAN, printed or in groups of four; mod-97 checked below (as every IBAN passes), so that other
# letter-digit codes survive.
_IBAN = re.compile(r"(?<![A-Za-z0-9])[A-Z]{2}\d{2}(?: ?[A-Z0-9]{4}){2,7}(?: ?[A-Z0-9]{1,3})?(?![A-Za-z0-9])")

# A payment card number: 13-19 digits, alone or grouped by single spaces or dashes; Luhn-checked below.
_CARD = re.compile(r"(?<![\w.-])\d(?:[ -]?\d){12,18}(?![\w-])")

# A phone number candidate: an optional +, then digit groups split by one space, dot or dash, with optional
# parenthesised groups ("(415) 555-0100", "+49 (0)30 1234567"); validated in _phone_replacement. Never across a
# line break (a column of numbers is not a phone number), and not when followed by ":digit" (a time of day).
_PHONE_SEP = r"[ \t\u00a0.-]"
_PHONE = re.compile(
    rf"(?<![\w.+/-])\+?(?:\(\d{{1,4}}\){_PHONE_SEP}?)?\d{{1,15}}"
    rf"(?:{_PHONE_SEP}(?:\(\d{{1,4}}\){_PHONE_SEP}?)?\d{{1,8}}|{_PHONE_SEP}?\(\d{{1,4}}\){_PHONE_SEP}?\d{{1,8}}){{0,6}}"
    r"(?!\w|:\d)"
)
_DIGIT_GROUP = re.compile(r"\d+")
# A bare digit run is a phone number only in a national shape: NANP ([2-9]xx [2-9]xx xxxx, optionally after
# the 1), or a trunk 0 then 9-10 digits (07700900123). So Unix timestamps (1700000000), 13-digit order numbers
# and 6-digit codes survive; a NANP-shaped number in code (`x = 4155550100 % 7`) is taken for a phone number,
# the over-redaction this module prefers.
_NATIONAL_NUMBER = re.compile(r"1?[2-9][0-8]\d[2-9]\d{6}|0[1-9]\d{8,9}")
_DATE = re.compile(r"\d{4}-\d{2}-\d{2}")


def redact_text(text: str, counts: Counter[str] | None = None) -> str:
    """`text` with e-mails, payment card numbers, IBANs, phone numbers and secrets replaced by placeholders.

    `counts`, when given, is incremented per kind ("email", "card", "iban", "phone", "secret").
    """
    if not text:
        return text
    tally: Counter[str] = counts if counts is not None else Counter()
    text = _sub(_KNOWN_SECRETS, text, lambda m: SECRET, tally, "secret")
    text = _sub(_AUTH_HEADER, text, _auth_header_replacement, tally, "secret")
    text = _sub(_BEARER, text, _bearer_replacement, tally, "secret")
    text = _sub(_ASSIGNED, text, lambda m: f"{m.group(1)}{m.group(2)}{SECRET}", tally, "secret")
    text = _sub(_PARAM, text, _param_replacement, tally, "secret")
    text = _sub(_PASSWORD_IS, text, _password_is_replacement, tally, "secret")
    # Before e-mails: `user:pw@host` would otherwise be read as the address `pw@host`, leaving the password.
    text = _sub(_URL_PASSWORD, text, lambda m: f"{m.group(1)}{SECRET}", tally, "secret")
    text = _sub(_EMAIL, text, lambda m: EMAIL, tally, "email")
    text = _sub(_OPAQUE, text, _opaque_replacement, tally, "secret")
    # Before cards and phones: an IBAN's digit groups look like either.
    text = _sub(_IBAN, text, _iban_replacement, tally, "iban")
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


def _auth_header_replacement(match: re.Match[str]) -> str | None:
    # A name in code (`authorization=token_value`) or a word (`Authorization: required`) is no credential.
    value = match.group(2)
    if value.isidentifier() and not _letters_and_digits(value):
        return None
    return f"{match.group(1)}{SECRET}"


def _bearer_replacement(match: re.Match[str]) -> str | None:
    value = match.group(3)
    mixed = _letters_and_digits(value)
    if match.group(1).lower() == "token" and not (len(value) >= 12 and mixed):
        return None
    if len(value) < 12 and not mixed:
        return None
    # A plain word ("Basic authentication", "Bearer Tokens") is prose; base64 credentials mix cases or digits.
    if value.isalpha() and (value[1:].islower() or value.isupper()):
        return None
    return f"{match.group(1)}{match.group(2)}{SECRET}"


def _param_replacement(match: re.Match[str]) -> str | None:
    value = match.group(3)
    in_query = match.start() > 0 and match.string[match.start() - 1] in "?&"
    looks_secret = (len(value) >= 8 and _TOKEN_CHARS.fullmatch(value) is not None and _letters_and_digits(value)
                    and not _attribute_path(value))
    return f"{match.group(1)}{match.group(2)}{SECRET}" if in_query or looks_secret else None


def _password_is_replacement(match: re.Match[str]) -> str | None:
    open_quote, value, close_quote = match.group(3), match.group(4), match.group(5)
    quoted = bool(open_quote) and open_quote == close_quote
    if not quoted and (open_quote or close_quote or not _letters_and_digits(value)):
        return None
    return f"{match.group(1)}{match.group(2)}{open_quote}{SECRET}{close_quote}"


def _attribute_path(value: str) -> bool:
    """`hashlib.sha256`, `batch.input_ids2`: names in code, not a credential."""
    return "." in value and all(part.isidentifier() for part in value.split("."))


def _letters_and_digits(value: str) -> bool:
    """Mixes letters and digits, as generated credentials do and words do not."""
    return any(c.isalpha() for c in value) and any(c.isdigit() for c in value)


def _iban_replacement(match: re.Match[str]) -> str | None:
    """IBAN for a 15-34 character code that passes ISO 13616's mod-97 check; 1 in 97 random ones pass too."""
    code = match.group(0).replace(" ", "")
    if not 15 <= len(code) <= 34:
        return None
    rearranged = code[4:] + code[:4]
    return IBAN if int("".join(str(int(c, 36)) for c in rearranged)) % 97 == 1 else None


def _phone_replacement(match: re.Match[str]) -> str | None:
    token = match.group(0)
    groups = _DIGIT_GROUP.findall(token)
    digits = sum(len(g) for g in groups)
    if token.startswith("+"):
        return PHONE if 8 <= digits <= 15 else None
    if len(groups) == 1:
        # An unseparated run: only a national shape (see _NATIONAL_NUMBER), and not a power of two or one less
        # (2147483647, 4294967296 are NANP-shaped and common in code).
        number = int(groups[0])
        power_of_two = number & (number - 1) == 0 or number & (number + 1) == 0
        return PHONE if _NATIONAL_NUMBER.fullmatch(token) and not power_of_two else None
    # Without a country code demand a full national number; shorter digit runs are sizes, years, ranges.
    # A long first group, a one-digit group after the first (ISBN 978-3-16-148410-0), a single dot (a decimal
    # number) or a date inside are not how phone numbers are written.
    if not 10 <= digits <= 15 or len(groups[0]) > 5 or any(len(g) == 1 for g in groups[1:]):
        return None
    if len(groups) == 2 and "." in token:
        return None
    # Two-digit groups throughout are a list ("10 20 30 40 50") unless led by a trunk 0 ("01 23 45 67 89").
    if all(len(g) <= 2 for g in groups) and not groups[0].startswith("0"):
        return None
    return None if _looks_like_date_or_address(token) or _DATE.search(token) else PHONE


def _looks_like_date_or_address(token: str) -> bool:
    return bool(re.fullmatch(r"\d{4}-\d{2}-\d{2}", token) or re.fullmatch(r"\d{1,3}(?:\.\d{1,3}){3}", token))
