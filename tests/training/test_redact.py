from collections import Counter

import pytest

from training.redact import EMAIL, PHONE, SECRET, redact_messages, redact_text


@pytest.mark.parametrize(
    "text",
    [
        "write to jane.doe+news@example.co.uk today",
        "ADMIN@Example.ORG",
    ],
)
def test_emails_are_redacted(text: str) -> None:
    out = redact_text(text)
    assert "@" not in out and EMAIL in out


@pytest.mark.parametrize(
    "text",
    ["call +1 (555) 123-4567", "call 555-123-4567", "office +44 20 7946 0958", "fax 555.123.4567"],
)
def test_phone_numbers_are_redacted(text: str) -> None:
    out = redact_text(text)
    assert PHONE in out and not any(ch.isdigit() for ch in out)


@pytest.mark.parametrize(
    "secret",
    [
        "sk-proj-abcdefghijklmnop1234567890",
        "sk-abcdefghijklmnopqrstuvwx",
        "AKIAIOSFODNN7EXAMPLE",
        "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",  # AWS secret access key shape
        "ghp_abcdefghijklmnopqrstuvwxyz0123456789",
        "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08",  # long hex
        "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFUP0THsR8U",
    ],
)
def test_secrets_are_redacted(secret: str) -> None:
    out = redact_text(f"my key is {secret} thanks")
    assert secret not in out and SECRET in out


def test_bearer_tokens_and_assigned_secrets_keep_their_labels() -> None:
    assert redact_text("Authorization: Bearer abc123def456ghi789") == f"Authorization: Bearer {SECRET}"
    assert redact_text('api_key = "hunter2hunter2"') == f'api_key = "{SECRET}"'
    assert redact_text("password: correcthorse") == f"password: {SECRET}"


@pytest.mark.parametrize(
    "text",
    [
        "Python 3.11.4 was released on 2023-06-06 from 192.168.100.200.",
        "Use sizes 1024 2048 and range(10, 20).",
        "Set PYTHONDONTWRITEBYTECODE or some_really_long_python_identifier_name_here.",
        "password = getpass.getpass()",
        "The assert statement inserts debugging assertions into a program.",
    ],
)
def test_ordinary_text_is_left_alone(text: str) -> None:
    assert redact_text(text) == text


def test_counts_by_kind_and_messages() -> None:
    counts: Counter[str] = Counter()
    messages = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "I am bob@example.com, key sk-abcdefghijklmnopqrstuvwx, tel 555-123-4567"},
    ]
    out = redact_messages(messages, counts)
    assert out[0] == messages[0]
    assert out[1]["content"] == f"I am {EMAIL}, key {SECRET}, tel {PHONE}"
    assert counts == Counter(email=1, secret=1, phone=1)
    assert "bob@example.com" in messages[1]["content"]  # the input is not mutated
