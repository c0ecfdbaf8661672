"""PII masking for `pagoda data prepare`: emails, phones, Chinese ID numbers, bank cards, IPs.

Each detected item is replaced by a typed placeholder (`[EMAIL]`, `[PHONE]`, `[CN_ID]`,
`[BANK_CARD]`, `[IP]` by default) and counted. Corpora are full of ordinary numbers (years,
amounts, dates, order numbers, versions, times), so a regex only proposes candidates and a
number is masked only when it also passes the check its issuer builds into it:

- email: `local@domain.tld`, ASCII only, so CJK text glued to an address stays outside it.
- cn_id: mainland resident ID, 17 digits and a check character (digit or X), born 1800-2099 on a
  real date (digits 7-14, YYYYMMDD) and passing the ISO 7064 MOD 11-2 checksum; a random
  18-digit number passes both about once in 10,000 times.
- bank_card: 13-19 digits, not starting with 0, bare or grouped in 4s by one kind of separator
  (space or dash), passing the Luhn check that every card number carries.
- phone: mainland mobiles, 1[3-9] and 9 more digits (optionally +86/86 first, spaces or dashes
  as 3-4-4), and international numbers written with +country code, 8-15 digits in all (E.164).
  National formats without +, like (415) 555-2671, are not: too like tables of numbers.
- ip: dotted quads and IPv6, each confirmed by the `ipaddress` module. A dotted quad with valid
  octets is masked even if it was a version number (as Presidio does); `v1.2.3.4` and `1.2.3`
  are not. An IPv6 candidate must hold a decimal digit, so `::` and C++'s `a::b` are not.

A candidate that fails its check is tried again cut before its last space- or dash-separated
group, so a phone number or card followed by another number (`+44 20 7946 0958 2024`) is found.

Numbers are found where they hold ASCII digits (NFKC, which runs first, folds full-width
digits to them). Every number pattern has digit lookarounds, so part of a longer digit run is
never masked (a digit of any script next to it counts); CJK characters and full-width
punctuation next to a number are boundaries. Types are detected in
priority order on the original text: email, then ID numbers and bank cards (an 18-digit ID
holds runs that look like phones), then phones, then IPs; a match overlapping an earlier type's
is dropped, so placeholders never nest.

Speed (the pipeline needs 5 MB/s on two cores, so this stage aims at 20 MB/s on one): text with
no digit and no `@` returns at once; otherwise each regex searches only short windows around the anchors its matches must
contain (an `@`; a digit run long enough, or next to `+`, dots or colons), and the number
patterns begin with a plain character class, which `re` skips to without trying every position.
"""

from __future__ import annotations

import ipaddress
import re
from bisect import bisect_left
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from datetime import date
from functools import partial

from pagoda.data.record import Record, Step
from pagoda.errors import ConfigError

_Span = tuple[int, int]  # [start, end) in the text


@dataclass(frozen=True)
class _Detector:
    """One PII type: the regex proposing candidates, the check they must pass, where to look.

    Every match contains one of the `anchor` matches (an `@`, a digit run) that `near` keeps and
    is at most `longest` characters long, so the regex searches only that far around those.
    """

    anchor: re.Pattern[str]
    near: Callable[[str, list[_Span]], list[_Span]]  # (text, anchors) -> those a match may hold
    longest: int
    pattern: re.Pattern[str]
    is_valid: Callable[[str], bool]


_CN_ID_WEIGHTS = (7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2)
_CN_ID_CHECK = "10X98765432"  # the check character for (weighted sum mod 11)


def validate_cn_id(s: str) -> bool:
    """Whether `s` is a mainland resident ID: 18 characters, a real birth date, a valid check."""
    if len(s) != 18 or not s[:17].isdecimal() or not 1800 <= int(s[6:10]) <= 2099:
        return False
    try:
        date(int(s[6:10]), int(s[10:12]), int(s[12:14]))
    except ValueError:
        return False
    total = sum(int(digit) * weight for digit, weight in zip(s[:17], _CN_ID_WEIGHTS, strict=True))
    return s[17].upper() == _CN_ID_CHECK[total % 11]


def luhn_ok(digits: str) -> bool:
    """Whether a digit string passes the Luhn check (every payment card number does)."""
    if not digits.isdecimal():
        return False
    total = 0
    for position, char in enumerate(reversed(digits)):
        value = int(char) * (2 if position % 2 else 1)
        total += value - 9 if value > 9 else value
    return total % 10 == 0


def _is_bank_card(candidate: str) -> bool:
    digits = candidate.replace(" ", "").replace("-", "")
    return 13 <= len(digits) <= 19 and luhn_ok(digits)


def _is_phone(candidate: str) -> bool:
    return 8 <= sum(char.isdecimal() for char in candidate) <= 15


def _is_ip(candidate: str) -> bool:
    try:
        ipaddress.ip_address(candidate)
    except ValueError:
        return False
    return any(char.isdecimal() for char in candidate)


_IP_LONGEST = 7 * 5 + 15  # seven groups "ffff:" and an IPv4 tail


def _runs_of_at_least(digits: int) -> Callable[[str, list[_Span]], list[_Span]]:
    return lambda text, runs: [(start, end) for start, end in runs if end - start >= digits]


def _ip_runs(text: str, runs: list[_Span]) -> list[_Span]:
    """The digit runs that may be in an IP: an IPv4 address's first octet has three dots after
    it; IPv6 digits are 4 or fewer from a colon, in `::` or seven colons (times like 12:30 not)."""
    kept = []
    for start, end in runs:
        if text.startswith(".", end) and text.count(".", end, start + 15) >= 3:
            kept.append((start, end))
        elif text.find(":", start - 4 if start > 4 else 0, end + 4) >= 0:
            around = max(start - _IP_LONGEST, 0), end + _IP_LONGEST
            if text.find("::", *around) >= 0 or text.count(":", *around) >= 7:
                kept.append((start, end))
    return kept


_AT = re.compile("@")
_DIGIT_RUN = re.compile(r"[0-9][0-9]*")  # not [0-9]+, see below
# `re` skips fast only to a pattern's first single character (not a repeat or a lookbehind), so
# the number patterns match one character first and then check what precedes it (`\d(?<!\d\d)`
# is `(?<!\d)\d`). IPv6 can start with any hex letter, so the IP pattern keeps its lookbehind
# first; it runs only near colons and dots. Phone digit groups are possessive (`\d{1,5}+`) so a
# long digit run is not tried split every possible way.
_MOBILE_AFTER_1 = r"[3-9]\d(?:[ -]?\d{4}){2}(?!\d)"

_DETECTORS: dict[str, _Detector] = {  # in priority order: an earlier type wins an overlap
    "email": _Detector(
        _AT, lambda text, ats: ats, 64 + 1 + 253,  # RFC 5321: local part @ domain
        re.compile(r"(?<![A-Za-z0-9._%+-])[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*"
                   r"\.[A-Za-z]{2,}"),
        lambda candidate: True),
    "cn_id": _Detector(
        _DIGIT_RUN, _runs_of_at_least(17), 18,
        re.compile(r"\d(?<!\d\d)\d{16}[\dXx](?!\d)"),
        validate_cn_id),
    "bank_card": _Detector(
        _DIGIT_RUN, _runs_of_at_least(4), 4 + 3 * 5 + 4,  # 4-4-4-4-3
        re.compile(r"[1-9](?<!\d\d)(?:\d{12,18}|\d{3}([ -])\d{4}(?:\1\d{4}){1,2}(?:\1\d{1,3})?)"
                   r"(?!\d)"),
        _is_bank_card),
    "phone": _Detector(  # a mobile holds 3+ digits in a row; an international number, +digit
        _DIGIT_RUN,
        lambda text, runs: [(start, end) for start, end in runs
                            if end - start >= 3 or start and text[start - 1] == "+"],
        1 + 3 + 6 * 7,  # +, country code, six groups like " (1234)"
        re.compile(r"\+(?<![0-9A-Za-z+]\+)[1-9]\d{0,2}(?:[ -]?(?:\(\d{1,4}\)|\d{1,5}+)){2,6}(?!\d)"
                   r"|8(?<!\d8)6[ -]?1" + _MOBILE_AFTER_1 + r"|1(?<!\d1)" + _MOBILE_AFTER_1),
        _is_phone),
    "ip": _Detector(
        _DIGIT_RUN, _ip_runs, _IP_LONGEST,
        re.compile(r"(?<![0-9A-Za-z.:])(?:\d{1,3}(?:\.\d{1,3}){3}(?![0-9A-Za-z]|\.\d)"
                   r"|(?:[0-9A-Fa-f]{0,4}:){2,7}(?:\d{1,3}(?:\.\d{1,3}){3}|[0-9A-Fa-f]{1,4})?"
                   r"(?![0-9A-Za-z:]|\.\d))"),
        _is_ip),
}


@dataclass(frozen=True)
class PiiConfig:
    """Which PII types to mask and the placeholder that replaces them.

    `placeholder` is a `str.format` template: `{TYPE}` is the type name in upper case, `{type}`
    in lower case (`"<{type}>"` gives `<email>`).
    """

    types: tuple[str, ...] = tuple(_DETECTORS)
    placeholder: str = "[{TYPE}]"

    def __post_init__(self) -> None:
        unknown = [name for name in self.types if name not in _DETECTORS]
        if unknown:
            raise ConfigError(f"unknown PII type(s) {', '.join(map(repr, unknown))}; "
                              f"valid types are {', '.join(_DETECTORS)}")
        try:
            self.placeholder.format(TYPE="EMAIL", type="email")
        except (AttributeError, IndexError, KeyError, ValueError) as error:
            raise ConfigError(f"PII placeholder {self.placeholder!r} is not a valid template "
                              f"({error!r}); use {{TYPE}} or {{type}}, e.g. '[{{TYPE}}]'") from None


def _windows(anchors: list[_Span], margin: int) -> list[_Span]:
    """The stretches within `margin` characters of the anchors, in order, overlaps merged."""
    windows: list[_Span] = []
    for anchor_start, anchor_end in anchors:
        start, end = max(anchor_start - margin, 0), anchor_end + margin
        if windows and start <= windows[-1][1]:
            windows[-1] = (windows[-1][0], end)
        else:
            windows.append((start, end))
    return windows


def _overlaps(taken: list[tuple[int, int, str]], start: int, end: int) -> bool:
    """Whether [start, end) overlaps a span of `taken` (sorted, non-overlapping)."""
    before_end = bisect_left(taken, (end,))
    return before_end > 0 and taken[before_end - 1][1] > start


def _valid_end(text: str, detector: _Detector, start: int, end: int) -> int | None:
    """Where the valid candidate at [start, end) ends: the whole match, or it cut before a
    trailing space- or dash-separated group (a phone number followed by a year); None if none."""
    while end > start:
        if detector.pattern.fullmatch(text, start, end) and detector.is_valid(text[start:end]):
            return end
        end = max(text.rfind(" ", start, end), text.rfind("-", start, end))
    return None


def _find(text: str, name: str, anchors: list[_Span],
          taken: list[tuple[int, int, str]]) -> list[tuple[int, int, str]]:
    """The valid matches of type `name` that overlap no span an earlier type took."""
    detector = _DETECTORS[name]
    found = []
    for position, window_end in _windows(detector.near(text, anchors), detector.longest):
        while match := detector.pattern.search(text, position, window_end):
            start = match.start()
            end = _valid_end(text, detector, start, match.end())
            if end and not _overlaps(taken, start, end):
                found.append((start, end, name))
                position = end
            else:  # a shorter candidate may start inside this one (a card after a year)
                position = start + 1
    return found


def mask_pii(text: str, config: PiiConfig = PiiConfig()) -> tuple[str, dict[str, int]]:
    """`text` with each PII item replaced by its placeholder, and the counts of the types found."""
    if not any(char in text for char in "@0123456789"):
        return text, {}  # much prose: `in` is far faster than any regex scan
    anchors: dict[re.Pattern[str], list[_Span]] = {}
    taken: list[tuple[int, int, str]] = []
    for name, detector in _DETECTORS.items():
        if name in config.types:
            if detector.anchor not in anchors:
                anchors[detector.anchor] = [match.span() for match in detector.anchor.finditer(text)]
            taken = sorted(taken + _find(text, name, anchors[detector.anchor], taken))
    if not taken:
        return text, {}
    pieces = []
    position = 0
    for start, end, name in taken:
        pieces += [text[position:start], config.placeholder.format(TYPE=name.upper(), type=name)]
        position = end
    pieces.append(text[position:])
    counts = Counter(name for _, _, name in taken)
    return "".join(pieces), {name: counts[name] for name in _DETECTORS if name in counts}


def _mask_record(record: Record, config: PiiConfig) -> Record:
    text, counts = mask_pii(record.text, config)
    return record.evolve("pii", text=text, pii=counts) if counts else record.evolve("pii")


def pii_step(config: PiiConfig = PiiConfig()) -> Step:
    """The pipeline stage: masks a record's PII, counts it in `meta["pii"]`, never drops.

    A `functools.partial` of a module-level function, so it pickles into worker processes.
    """
    return partial(_mask_record, config=config)
