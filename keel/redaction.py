"""Layer 3 of the agent guardrails: output filtering of the answer that leaves a task.

`redact` takes out personal data an answer must not carry: every full card number, and other people's
IBANs, e-mail addresses, phone numbers and account ids, and US social security numbers. The person the
task is done for (`OwnIdentity`) may see their own e-mail, phone, account ids and IBANs. The
placeholder rules find unfilled templates (keel.output uses them on every agent's answer).

Pure and deterministic (no I/O, no clock, no randomness, only `re`), so a workflow can call it inside
the Temporal sandbox and a replay gets the same answer.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from pydantic import BaseModel, Field

KINDS = ("card", "card_code", "card_expiry", "iban", "ssn", "email", "phone", "account")
"""Redaction kinds, in the order they are applied: a card number is also a digit run that a phone
rule could match, so the most specific (and checksum-validated) kinds go first."""
PLACEHOLDERS = {kind: f"[redacted {kind}]" for kind in KINDS}
_MAX_ROUNDS = 4
"""`redact` repeats its pass until nothing more is found (a placeholder can free a boundary that hid a
match); in practice the second round finds nothing. The cap bounds the work on hostile input."""
_QUOTE_CHARS = 60


class OwnIdentity(BaseModel):
    """The person a task is done for: their own e-mail, phone, account ids and IBANs may appear in an
    answer."""

    owner_id: str
    email: str | None = None
    phone: str | None = None
    account_ids: list[str] = Field(default_factory=list)
    ibans: list[str] = Field(default_factory=list)


class RedactionReport(BaseModel):
    """The redacted text and how many redactions of each kind were made (every kind is present)."""

    text: str
    counts: dict[str, int] = Field(default_factory=lambda: dict.fromkeys(KINDS, 0))

    @property
    def total(self) -> int:
        return sum(self.counts.values())


# --- matching ------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class _Hit:
    start: int
    end: int
    keep: bool = False
    """The person's own value: left as it is, but no later rule may match inside it."""


_Finder = Callable[[str, OwnIdentity | None], _Hit | None]
"""The leftmost hit of one kind in a text, or None."""

# Cards: a run of digits, single spaces or dashes between them; candidate windows are whole groups.
_DIGIT_RUN = re.compile(r"[0-9](?:[ -]?[0-9])*")
_DIGITS = re.compile(r"[0-9]+")

# IBAN: country, check digits, then 11-30 alphanumerics, compact or in groups of 4 (last group 1-4).
_IBAN = re.compile(
    r"(?<![A-Za-z])[A-Za-z]{2}[0-9]{2}"
    r"(?:[A-Za-z0-9]{11,30}|(?: [A-Za-z0-9]{4}){2,7}(?: [A-Za-z0-9]{1,4})?)"
    r"(?![A-Za-z0-9])"
)
_BAD_IBAN_CHECK = frozenset({"00", "01", "99"})
"""ISO 13616 check digits are 02-98; 01 and 99 pass mod-97 only as aliases of 98 and 02."""

_SSN = re.compile(r"(?<![0-9-])(?!000|666|9)[0-9]{3}-(?!00)[0-9]{2}-(?!0000)[0-9]{4}(?![0-9-])")

_EMAIL = re.compile(r"(?<![A-Za-z0-9._%+-])[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}")

# Phones. A national number starting with a digit must not start inside a word or a number ("12.030...",
# "T-0151..."), and no phone may end where a number goes on ("1234567.89"): amounts, dates and ids stay.
# A "+" or "(" start needs no such guard.
_NS = r"(?<![A-Za-z0-9_+])(?<![0-9][.,/-])"
_PHONE = re.compile(
    r"(?:"
    # +CC, then digit groups split by one space, dash or dot, or by a parenthesised group: +49 (0)151 1234567
    r"(?P<intl>\+[0-9]+(?:(?:[ .-]|[ .-]?\([0-9]{1,5}\)[ .-]?)[0-9]+)*)"
    # North American: (555) 123-4567, 1 (555) 123-4567, 555-123-4567, 1-555-123-4567
    rf"|(?P<nanp>(?:{_NS}1[ .-])?\([0-9]{{3}}\) ?[0-9]{{3}}[ .-][0-9]{{4}}"
    rf"|{_NS}(?:1[ .-])?[0-9]{{3}}[ .-][0-9]{{3}}[ .-][0-9]{{4}})"
    # French-style pairs: 01 23 45 67 89
    rf"|(?P<pairs>{_NS}0[1-9](?:[ .][0-9]{{2}}){{4}})"
    # trunk prefix 0: (030) 123 4567, 030 1234567, 030/1234567, 0151-12345678, 01511234567
    rf"|(?P<trunk>(?:\(0[0-9]{{1,5}}\) ?[0-9]+|{_NS}0[0-9]+)(?:[ /-][0-9]{{3,}})*)"
    r")(?![0-9]|[.,][0-9])"  # the same test as _NUMBER_GOES_ON
)
_PHONE_DIGITS = {"intl": (8, 15), "trunk": (10, 15)}
"""Digits a phone of this form may have; a longer candidate is cut at the longest valid prefix."""
_TRUNK_IN_PARENS = re.compile(r"\(0\)")
_NUMBER_GOES_ON = re.compile(r"[0-9]|[.,][0-9]")

_ACCOUNT = re.compile(r"(?<![A-Za-z0-9_-])A-[0-9]{4,}(?![.,/-][0-9])")
"""Not where a number goes on ("A-5001.030 ..."): a phone there is not redacted either, consistently."""


def _luhn_ok(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = (ord(ch) - 48) * (2 if i % 2 else 1)
        total += d - 9 if d > 9 else d
    return total % 10 == 0


def _normal_iban(iban: str) -> str:
    return iban.replace(" ", "").upper()


def _iban_ok(candidate: str) -> bool:
    """ISO 13616: move the first four characters to the end, letters to 10..35, the number mod 97 is 1."""
    s = _normal_iban(candidate)
    if not 15 <= len(s) <= 34 or s[2:4] in _BAD_IBAN_CHECK:
        return False
    return int("".join(str(int(c, 36)) for c in s[4:] + s[:4])) % 97 == 1


def _ibans(text: str) -> Iterator[tuple[int, int]]:
    """Spans of valid IBANs. A candidate that swallowed the words after it ("... 7034 EUR") is cut back
    group by group; a candidate that fails is retried one character on, so it cannot hide an IBAN."""
    pos = 0
    while (m := _IBAN.search(text, pos)) is not None:
        cand = m.group()
        cuts = [len(cand), *(i for i in range(len(cand) - 1, 3, -1) if cand[i] == " ")]
        end = next((m.start() + cut for cut in cuts if _iban_ok(cand[:cut])), None)
        if end is None:
            pos = m.start() + 1
        else:
            yield m.start(), end
            pos = end


def _first_iban(text: str, own: OwnIdentity | None) -> _Hit | None:
    span = next(_ibans(text), None)
    if span is None:
        return None
    mine = own is not None and _normal_iban(text[span[0] : span[1]]) in {_normal_iban(i) for i in own.ibans}
    return _Hit(*span, keep=mine)


def _first_card(text: str, own: OwnIdentity | None) -> _Hit | None:
    """Leftmost Luhn-valid window of 13-19 digits made of whole digit groups. Digits inside a valid IBAN
    are not card digits, nor are those of a phone written "+CC ..." (up to 15 digits, E.164)."""
    shielded = list(_ibans(text))
    for run in _DIGIT_RUN.finditer(text):
        groups = [(run.start() + g.start(), run.start() + g.end()) for g in _DIGITS.finditer(run.group())]
        sub: list[tuple[int, int]] = []
        for g in [*groups, None]:
            if g is not None and not any(s <= g[0] < e for s, e in shielded):
                sub.append(g)
                continue
            hit = _card_window(text, sub)
            if hit is not None:
                return hit
            sub = []
    return None


def _card_window(text: str, groups: list[tuple[int, int]]) -> _Hit | None:
    """From the leftmost group on, the longest valid window; so what is left of the run on either side of
    it holds no card window that was not already tried, and a second pass finds nothing new."""
    if not groups:
        return None
    phone_end = -1
    if groups[0][0] >= 1 and text[groups[0][0] - 1] == "+":
        m = _PHONE.match(text, groups[0][0] - 1)
        phone_end = (_phone_end(m) or -1) if m is not None else -1
    for i in range(len(groups)):
        digits, best = "", None
        for j in range(i, len(groups)):
            digits += text[groups[j][0] : groups[j][1]]
            if len(digits) > 19:
                break
            if len(digits) >= 13 and groups[j][1] > phone_end and _luhn_ok(digits):
                best = j
        if best is not None:
            return _Hit(groups[i][0], groups[best][1])
    return None


def _first_ssn(text: str, own: OwnIdentity | None) -> _Hit | None:
    m = _SSN.search(text)
    return None if m is None else _Hit(m.start(), m.end())


def _first_email(text: str, own: OwnIdentity | None) -> _Hit | None:
    m = _EMAIL.search(text)
    if m is None:
        return None
    mine = own is not None and own.email is not None and m.group().lower() == own.email.strip().lower()
    return _Hit(m.start(), m.end(), keep=mine)


def _phone_digits(phone: str) -> str:
    return "".join(ch for ch in _TRUNK_IN_PARENS.sub("", phone) if ch.isascii() and ch.isdigit())


def _same_phone(found: str, own: str) -> bool:
    """Digits only; a national writing ("0151 6433012") of the own "+49 151 6433012" is the same phone."""
    a, b = _phone_digits(found), _phone_digits(own)
    if a == b:
        return True
    national = a[1:] if not found.startswith("+") and a.startswith("0") else ""
    return (len(national) >= 7 and own.strip().startswith("+") and b.endswith(national)
            and 1 <= len(b) - len(national) <= 3)


def _phone_end(m: re.Match[str]) -> int | None:
    """End of the longest valid prefix of a phone candidate (cut at the end of a digit group)."""
    form = m.lastgroup or ""
    if form not in _PHONE_DIGITS:
        return m.end()
    lo, hi = _PHONE_DIGITS[form]
    best = None
    for g in _DIGITS.finditer(m.group()):
        n = len(_phone_digits(m.group()[: g.end()]))
        if n > hi:
            break
        end = m.start() + g.end()
        if n >= lo and not _NUMBER_GOES_ON.match(m.string, end):
            best = end
    return best


def _first_phone(text: str, own: OwnIdentity | None) -> _Hit | None:
    pos = 0
    while (m := _PHONE.search(text, pos)) is not None:
        end = _phone_end(m)
        if end is None:
            pos = m.start() + 1
            continue
        mine = own is not None and own.phone is not None and _same_phone(text[m.start() : end], own.phone)
        return _Hit(m.start(), end, keep=mine)
    return None


# A card's security code and expiry date are secrets beside its number (which always goes): named by their
# usual labels, since three digits or a month/year alone are ordinary text.
_CARD_CODE = re.compile(r"\b(?:cvv2?|cvc2?|cvn|cid|csc|security code|card verification (?:code|value))\b"
                        r"(?:\s*(?:is|was|:|#|=|-))*\s*([0-9]{3,4})(?![0-9])", re.I)
_CARD_EXPIRY = re.compile(r"\b(?:exp(?:\.|iry|iration)?(?: date)?|expires?|expiring|valid (?:thru|through|until)"
                          r"|good thru)(?:\s*(?:is|on|:|=|-))*\s*((?:0?[1-9]|1[0-2])\s?[/-]\s?(?:[0-9]{4}|[0-9]{2}))"
                          r"(?![0-9/])", re.I)


def _first_card_code(text: str, own: OwnIdentity | None) -> _Hit | None:
    m = _CARD_CODE.search(text)
    return None if m is None else _Hit(m.start(1), m.end(1))


def _first_card_expiry(text: str, own: OwnIdentity | None) -> _Hit | None:
    m = _CARD_EXPIRY.search(text)
    return None if m is None else _Hit(m.start(1), m.end(1))


def _first_account(text: str, own: OwnIdentity | None) -> _Hit | None:
    m = _ACCOUNT.search(text)
    if m is None:
        return None
    mine = own is not None and m.group() in {a.strip().upper() for a in own.account_ids}
    return _Hit(m.start(), m.end(), keep=mine)


_FINDERS: list[tuple[str, _Finder]] = [
    ("card", _first_card),
    ("card_code", _first_card_code),
    ("card_expiry", _first_card_expiry),
    ("iban", _first_iban),
    ("ssn", _first_ssn),
    ("email", _first_email),
    ("phone", _first_phone),
    ("account", _first_account),
]


# --- redaction -----------------------------------------------------------------------------
_Piece = tuple[str, bool]
"""(text, settled): a settled piece is a placeholder or a kept own value that no rule may touch again."""


def _scan(text: str, kind: str, find: _Finder, own: OwnIdentity | None, counts: dict[str, int]) -> list[_Piece]:
    """Split a text at the hits of one kind. The text on each side of a hit is scanned on its own, as it
    will be once the hit is a placeholder: so a second `redact` sees what the first one saw."""
    out: list[_Piece] = []
    todo: list[str | _Piece] = [text]
    while todo:
        item = todo.pop()
        if isinstance(item, tuple):
            out.append(item)
            continue
        if not item:
            continue
        hit = find(item, own)
        if hit is None:
            out.append((item, False))
            continue
        if hit.keep:
            settled = (item[hit.start : hit.end], True)
        else:
            settled = (PLACEHOLDERS[kind], True)
            counts[kind] += 1
        todo += [item[hit.end :], settled, item[: hit.start]]
    return out


def _redact_once(text: str, own: OwnIdentity | None) -> tuple[str, dict[str, int]]:
    counts = dict.fromkeys(KINDS, 0)
    pieces: list[_Piece] = [(text, False)]
    for kind, find in _FINDERS:
        pieces = [p for piece in pieces
                  for p in ([piece] if piece[1] else _scan(piece[0], kind, find, own, counts))]
    return "".join(t for t, _ in pieces), counts


def redact(text: str, own: OwnIdentity | None) -> RedactionReport:
    """Replace personal data the reply must not carry by `[redacted <kind>]`.

    Card numbers always go (a reply never carries a full card number); IBANs, e-mails, phones and
    account ids go unless they are `own`'s (with `own` None nothing is own); SSNs always go.
    """
    counts = dict.fromkeys(KINDS, 0)
    for _ in range(_MAX_ROUNDS):
        text, found = _redact_once(text, own)
        for kind, n in found.items():
            counts[kind] += n
        if not any(found.values()):
            break
    return RedactionReport(text=text, counts=counts)


# --- answer rules ---------------------------------------------------------------------------
_PLACEHOLDER_RULES = [
    re.compile(r"\{\{[^{}]{0,200}\}\}"),
    re.compile(r"\{\s*[A-Za-z_][A-Za-z0-9_.]*\s*\}"),
    re.compile(r"\[[A-Z][A-Z0-9_]+(?:[ _/-][A-Z0-9_]+)*\]"),
    re.compile(r"<\s*insert\b[^>]*>", re.I),
    re.compile(r"\[\s*insert\b[^\]]*\]", re.I),
    re.compile(r"\[(?:your|customer|recipient|client|user|company|first|last|full|agent)(?:'s|\u2019s)?"
               r"(?: [a-z]+){0,3}\]", re.I),
    re.compile(r"<[A-Z][A-Z_ ]{2,30}>"),
]
"""Unfilled templates: {name}, {{...}}, [CUSTOMER NAME], [Your Name], [Customer's Name], <NAME>, <insert ...>.
Our [redacted ...] is lower case and never matches."""

def _quote(fragment: str) -> str:
    fragment = " ".join(fragment.split())
    return '"' + (fragment[:_QUOTE_CHARS] + "..." if len(fragment) > _QUOTE_CHARS else fragment) + '"'


def _found(rules: list[re.Pattern[str]], text: str) -> list[str]:
    """Matched fragments, left to right, each once; a match inside an earlier one is not repeated."""
    spans = sorted((m.start(), m.end()) for rule in rules for m in rule.finditer(text))
    out: list[str] = []
    last_end = -1
    for start, end in spans:
        if start < last_end:
            continue
        last_end = end
        if text[start:end] not in out:
            out.append(text[start:end])
    return out
