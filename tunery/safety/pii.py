"""Personal data in text, found by pattern plus the check that makes a match real: a checksum (Luhn, mod 97,
11-proof, Verhoeff, mod 11, check letters), a numbering plan (libphonenumber via `phonenumbers`), validity
rules (SSN areas, NINO prefixes), the `ipaddress` module, a calendar, or a keyword before the match. The
checks are what keeps order numbers, prices, ISBNs, timestamps and version strings out.

>>> [(f.category, f.text) for f in find_personal_data("Mail jane.doe@gmail.com or call 415-867-5309")]
[('email', 'jane.doe@gmail.com'), ('phone', '415-867-5309')]
>>> redact("Mail jane.doe@gmail.com or call 415-867-5309")
'Mail [EMAIL] or call [PHONE]'

Placeholders are not personal data. Addresses at reserved domains (RFC 2606 / 6761: example.com,
.example, .test, .invalid, .localhost) and role accounts (support@, info@, noreply@), NANP 555-0100..0199
and Ofcom drama numbers, documentation and private IP ranges, published test card numbers and the
sample ids that documents print are all reported, with `fictional=True` and a `reason`, so a screen can
show them; they never count as personal data and `redact` leaves them in place.

Not covered: names, street addresses, free-text health details, and ids of countries not listed below:
US SSN, UK NINO, IBANs, Dutch BSN, Spanish DNI/NIE, French NIR, Brazilian CPF, Indian Aadhaar, NHS numbers.
A date of birth or medical record number is found only after a keyword ("DOB", "born", "MRN", ...).
"""

from __future__ import annotations

import bisect
import datetime
import functools
import ipaddress
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

CATEGORIES = (
    "email",
    "phone",
    "national_id",
    "payment_card",
    "ip_address",
    "date_of_birth",
    "medical_record",
)
PLACEHOLDERS = {category: f"[{category.upper()}]" for category in CATEGORIES}
# Which finding wins where two overlap: the stricter check (a checksum beats a phone-number plan).
_RANK = {
    c: rank
    for rank, c in enumerate(
        ("payment_card", "national_id", "medical_record", "email", "ip_address", "date_of_birth", "phone")
    )
}
PHONE_REGIONS = ("US", "GB")  # national-format numbers are read as these countries'; "+..." as any
# Other countries' national-format numbers are read only after a word for a phone ("Tel.", "móvil", "Handy",
# "appelez", ...) close before them: their plans take too many other numbers for a default that blocks a
# run (any 9 digits from 6 make a Spanish mobile, any 10 from 0 a French number: ids, amounts, the digits
# of a hash between two letters).
KEYWORD_REGIONS = ("FR", "DE", "ES", "PT", "IT", "NL", "BE", "AT", "CH", "BR")
# whose national numbers start with 0: "(800) 010-4477", a US-style number, is no British one
TRUNK_ZERO_REGIONS = frozenset({"GB", "FR", "DE", "NL", "BE", "AT", "CH"})
_AFTER_COUNTRY_CODE = re.compile(r"\+\d{1,3}[ .-]?$")  # "+1 (555) 010": the rest of an international number
PHONE_WORD_REACH = 40  # characters before a number where a word for a phone counts
_PHONE_WORD = re.compile(
    r"\b(?:tel|t[ée]l[ée]?phon|tel[ée]fon|telf|phone|mobile?|m[óo]vil|handy|portable|cell|celular|"
    r"telem[óo]vel|cellulare|whats ?app|fax|ll[áa]m|appel|ruf|ligue|liga|chiama|bel|contacto|contato|"
    r"kontakt|fixe|fijo|gsm|natel|festnetz|landline)\w*",
    re.IGNORECASE,
)


@dataclass(frozen=True)
class Finding:
    """A span of `text` that looks like personal data. `fictional` marks a match that is not a person's
    data (a placeholder, documentation or test value, a role account, a toll-free or other service
    number, a private address); `reason`
    says which. `detector` names the check that matched, e.g. `luhn:visa`, `iban`, `us_ssn`."""

    category: str
    start: int
    end: int
    text: str
    detector: str
    fictional: bool = False
    reason: str = ""


def find_personal_data(text: str) -> list[Finding]:
    """Every finding in `text`, in order, overlaps resolved (the stricter detector keeps the span)."""
    found: list[Finding] = []
    if "@" in text:
        found += _emails(text)
    if _DIGIT.search(text):
        for detector in (_cards, _national_ids, _medical_records, _ip_addresses, _dates_of_birth, _phones):
            found += detector(text)
    return _without_overlaps(found)


def redact(text: str, categories: Iterable[str] | None = None) -> str:
    """`text` with each span of personal data (of `categories`, default all) replaced by its placeholder,
    e.g. `[EMAIL]`. Fictional findings stay: they carry meaning and identify no one."""
    wanted = set(CATEGORIES if categories is None else categories)
    unknown = wanted - set(CATEGORIES)
    if unknown:
        raise ValueError(f"unknown categories {sorted(unknown)}; choose from {', '.join(CATEGORIES)}")
    spans = [f for f in find_personal_data(text) if not f.fictional and f.category in wanted]
    for f in reversed(spans):
        text = text[: f.start] + PLACEHOLDERS[f.category] + text[f.end :]
    return text


def _without_overlaps(found: list[Finding]) -> list[Finding]:
    """The stricter, then longer finding keeps a span. The spans kept never overlap, so sorted by start
    only the neighbours of a new one can touch it: a binary search each, where comparing with every kept
    span was quadratic ("MRN 1234 " repeated over 512 KB took minutes)."""
    kept: list[Finding] = []  # by start
    starts: list[int] = []
    for f in sorted(found, key=lambda f: (_RANK[f.category], f.start - f.end, f.start)):
        i = bisect.bisect_left(starts, f.start)
        if (i > 0 and kept[i - 1].end > f.start) or (i < len(kept) and kept[i].start < f.end):
            continue
        kept.insert(i, f)
        starts.insert(i, f.start)
    return kept


def _finding(category: str, m: re.Match[str], group: int | str, detector: str, reason: str = "") -> Finding:
    return Finding(category, m.start(group), m.end(group), m.group(group), detector, bool(reason), reason)


_DIGIT = re.compile(r"\d")

# --- email -----------------------------------------------------------------------------------------------

# A match may start only where a run of local-part characters starts (an opening quote is fine): one start
# per run, where starting after each apostrophe of "a'a'a'..." made the search quadratic.
_EMAIL = re.compile(
    r"(?<![\w.%+-])(?<![\w.%+'-]')([A-Za-z0-9_%+-][A-Za-z0-9._%+'-]*)@((?:[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?\.)+"
    r"[A-Za-z]{2,63})(?![\w-])"
)
_RESERVED_DOMAINS = ("example", "test", "invalid", "localhost", "example.com", "example.net", "example.org")
_ROLE_ACCOUNTS = frozenset(  # word lists read better as words
    "support info help sales contact admin administrator webmaster postmaster hostmaster abuse security "  # noqa: SIM905
    "privacy billing accounts accounting noreply donotreply mailerdaemon hello team office press media "
    "marketing careers jobs hr legal feedback service customerservice customercare care orders returns "
    "enquiries inquiries newsletter notifications alerts root it helpdesk servicedesk reception bookings "
    "reservations shop store".split()
)


def _emails(text: str) -> Iterator[Finding]:
    for m in _EMAIL.finditer(text):
        local, domain = m.group(1), m.group(2).lower()
        reason = ""
        if any(domain == d or domain.endswith("." + d) for d in _RESERVED_DOMAINS):
            reason = f"reserved domain {domain} (RFC 2606/6761)"
        elif re.sub(r"[._-]", "", local.lower().split("+")[0]) in _ROLE_ACCOUNTS:
            reason = "role account, not a person"
        yield _finding("email", m, 0, "email", reason)


# --- phone numbers (libphonenumber's plans) -------------------------------------------------------------

# A run of digits and separators, the only places a phone number can be: libphonenumber's matcher runs on
# these runs (and a few characters of context) rather than on the whole text, several times faster.
_DIGIT_RUN = re.compile(r"\d[\d \t().\-/]*\d")
_TRUNK_ZERO = re.compile(r"(?<!\d)\(?0\d")  # national-format numbers outside North America start with 0
# An id written right after one of these words is an order/ticket/account number, not a phone number.
_NOT_PHONE_BEFORE = re.compile(
    r"\b(?:order|invoice|tracking|ticket|case|ref|reference|confirmation|account|acct|sku|serial|isbn|po|"
    r"item|part|model|transaction|txn|id|receipt|booking|customer|member|policy|"
    # the same in Spanish, French, German, Portuguese and Italian
    r"pedido|factura|refer[eê]ncia|seguimiento|reserva|cliente|commande|facture|r[ée]f[ée]rence|r[ée]f|suivi|"
    r"dossier|client|compte|contrat|colis|s[ée]rie|p[óo]liza|expediente|localizador|protocolo|albar[áa]n|"
    r"bestellung|bestellnummer|rechnung|rechnungsnummer|auftrag|sendung|kundennummer|encomenda|fatura|"
    r"rastreio|ordine|fattura|riferimento)"
    r"\s*(?:no\.?|number|-?nr\.?|id|n\.?[º°o]?\.?|n[úu]m\.?|n[úu]mero|num[ée]ro|nummer)?"
    r"\s*[:#.]?(?:\s*(?:is|was|=|es|est|ist|é|è))?\s*#?\s*$|#\s*$",
    re.IGNORECASE,
)
# Ofcom's numbers for drama (national significant numbers, without the leading 0).
_UK_DRAMA = tuple(f"{area}4960" for area in (113, 114, 115, 116, 117, 118, 121, 131, 141, 151, 161))
_UK_DRAMA += ("2079460", "2920180", "1632960", "7700900", "8081570", "9098790", "3069990")


@functools.cache
def _phonenumbers() -> Any:
    import phonenumbers  # ~0.1 s, only for text that holds 7+ digits

    return phonenumbers


def _phones(text: str) -> Iterator[Finding]:
    for run in _DIGIT_RUN.finditer(text):
        if sum(c.isdigit() for c in run.group(0)) >= 7:
            yield from _phones_in(text, run, max(0, run.start() - 4), run.end() + 4)


def _phones_in(text: str, run: re.Match[str], lo: int, hi: int) -> Iterator[Finding]:
    pn = _phonenumbers()
    window = text[lo:hi]
    decided: set[tuple[int, int]] = set()
    digits = {i for i in range(run.start(), run.end()) if text[i].isdigit()}  # read once all are decided
    # "+..." are read in the first, as any country's; the others' numbers start with a trunk 0
    regions = [r for i, r in enumerate(PHONE_REGIONS) if i == 0 or _TRUNK_ZERO.search(window)]
    called = bool(_PHONE_WORD.search(text[max(0, lo - PHONE_WORD_REACH) : lo + 4]))
    if called:
        regions += KEYWORD_REGIONS
    for region in regions:
        if digits <= {i for start, end in decided for i in range(start, end)}:
            break  # every digit of the run is in a number read or ruled out
        for match in pn.PhoneNumberMatcher(window, region, leniency=pn.Leniency.POSSIBLE):
            span = (lo + match.start, lo + match.end)
            raw, number = match.raw_string, match.number
            if span in decided:
                continue
            if (
                region in TRUNK_ZERO_REGIONS
                and not raw.startswith("+")
                and not raw.lstrip("(").startswith("0")
            ):
                continue
            if (
                region in KEYWORD_REGIONS
                and not raw.startswith("+")
                and (
                    not _apart(text, *span) or _AFTER_COUNTRY_CODE.search(text[max(0, span[0] - 6) : span[0]])
                )
            ):
                continue  # digits inside a word or a hash, or after another country's code
            if (
                not called
                and not raw.startswith(("+", "("))
                and _NOT_PHONE_BEFORE.search(text[max(0, span[0] - 40) : span[0]])
            ):
                decided.add(span)
                continue
            valid = pn.is_valid_number(number)
            reason = _fictional_phone(number.country_code, str(number.national_number))
            if valid and not reason:
                reason = _service_line(number, raw, regions)
            if reason or valid:
                decided.add(span)
                yield Finding("phone", span[0], span[1], raw, f"phonenumbers:{region}", bool(reason), reason)


def _apart(text: str, start: int, end: int) -> bool:
    """Whether text[start:end] stands on its own: no letter, digit or underscore right before or after."""
    before = text[start - 1] if start > 0 else " "
    after = text[end] if end < len(text) else " "
    return not (before.isalnum() or before == "_" or after.isalnum() or after == "_")


def _service_line(number: Any, raw: str, regions: Sequence[str]) -> str:
    """Why a number is an organisation's line rather than a person's, from its numbering plan (toll-free,
    shared-cost, premium-rate and universal access numbers are leased to businesses and services: a
    support hotline, a helpline); "" for any other number. Written without its country code, it must be
    toll-free in every country the detector reads it as (`regions`, those of its window): a person's
    number of one country is often a valid service number of another (Berlin's 030 1234 5678 is a British
    universal access number, a Brazilian landline (83) 3221-4567 an American toll-free one)."""
    pn = _phonenumbers()
    service = {
        pn.PhoneNumberType.TOLL_FREE: "toll-free",
        pn.PhoneNumberType.SHARED_COST: "shared-cost",
        pn.PhoneNumberType.PREMIUM_RATE: "premium-rate",
        pn.PhoneNumberType.UAN: "universal access",
    }  # PERSONAL_NUMBER and VOIP are people's
    if raw.startswith("+"):
        kind = service.get(pn.number_type(number))
        return f"a {kind} number: an organisation's line, not a person's" if kind else ""
    readings = []
    for region in regions:
        if region in TRUNK_ZERO_REGIONS and not raw.lstrip("(").startswith("0"):
            continue  # as the detector reads them
        try:
            reading = pn.parse(raw, region)
        except pn.NumberParseException:
            continue
        if pn.is_valid_number(reading):
            readings.append(pn.number_type(reading))
    if readings and all(kind == pn.PhoneNumberType.TOLL_FREE for kind in readings):
        return "a toll-free number: an organisation's line, not a person's"
    return ""


def _fictional_phone(country_code: int, national: str) -> str:
    if country_code == 1:
        if len(national) == 10 and national[3:6] == "555" and 100 <= int(national[6:]) <= 199:
            return "NANP fictional range 555-0100..0199"
        if len(national) == 7 and national.startswith("55501"):
            return "NANP fictional range 555-0100..0199"
        if len(national) == 10 and national.startswith("555"):
            return "area code 555 is not in service (a placeholder)"
    if country_code == 44 and national.startswith(_UK_DRAMA):
        return "Ofcom drama number"
    return ""


# --- national ids ----------------------------------------------------------------------------------------

_SSN = re.compile(r"(?<![\d-])(\d{3})-(\d{2})-(\d{4})(?![\d-])")
_SSN_AFTER_KEYWORD = re.compile(
    r"\b(?:SSN|social\s+security(?:\s+(?:number|no\.?|#))?)\W{0,6}(\d{3}([ -]?)\d{2}\2\d{4})(?![\d-])",
    re.IGNORECASE,
)
_SAMPLE_SSNS = {
    "078051120": "the Woolworth wallet sample",
    "219099999": "an advertised sample",
    "123456789": "a sample number",
}
_NINO = re.compile(
    r"(?<![A-Za-z0-9])((?:[A-CEGHJ-PR-TW-Z][A-CEGHJ-NPR-TW-Z]|QQ) ?\d{2} ?\d{2} ?\d{2} ?[A-D])(?![A-Za-z0-9])"
)
_NINO_UNUSED_PREFIXES = ("BG", "GB", "KN", "NK", "NT", "TN", "ZZ")
_IBAN = re.compile(r"(?<![A-Za-z0-9])([A-Z]{2}\d{2}(?: ?[A-Z0-9]){10,32})")
_IBAN_LENGTHS = dict(
    (entry[:2], int(entry[2:]))
    for entry in (  # noqa: SIM905
        "AD24 AE23 AL28 AT20 AZ28 BA20 BE16 BG22 BH22 BR29 BY28 CH21 CR22 CY28 CZ24 DE22 DK18 DO28 EE20 "
        "EG29 ES24 FI18 FO18 FR27 GB22 GE22 GI23 GL18 GR27 GT28 HR21 HU28 IE22 IL23 IQ23 IS26 IT27 JO30 "
        "KW30 KZ20 LB28 LC32 LI21 LT20 LU20 LV21 MC27 MD24 ME22 MK19 MR27 MT31 MU30 NL18 NO15 PK24 PL28 "
        "PS29 PT25 QA29 RO24 RS22 SA24 SC31 SE24 SI19 SK24 SM27 ST25 SV28 TL23 TN24 TR26 UA29 VA22 VG24 XK20"
    ).split()
)
_SAMPLE_IBANS = frozenset(
    "GB82WEST12345698765432 DE89370400440532013000 GB29NWBK60161331926819 FR1420041010050500013M02606 "  # noqa: SIM905
    "NL91ABNA0417164300 GB33BUKB20201555555555 CH9300762011623852957 ES9121000418450200051332 "
    "BE68539007547034".split()
)
_BSN = re.compile(
    r"\b(?:BSN|burgerservicenummer|sofi-?nummer)\W{0,6}(\d{4}\.\d{2}\.\d{3}|\d{3}[ .-]?\d{3}[ .-]?\d{3})(?!\d)",
    re.IGNORECASE,
)
_DNI = re.compile(r"(?<![A-Za-z0-9-])(\d{8}|[XYZ]-?\d{7})-?([A-Z])(?![A-Za-z0-9])")
_DNI_LETTERS = "TRWAGMYFPDXBNJZSQVHLCKE"
# France's social security number (NIR): sex, year, month, department (2A/2B for Corsica), commune, serial,
# then a key: 97 minus the 13 digits mod 97
_NIR = re.compile(
    r"(?<![\dA-Za-z])([12]) ?(\d{2}) ?(0[1-9]|1[0-2]|[2-9]\d) ?(\d{2}|2[AB]) ?(\d{3}) ?(\d{3}) ?(\d{2})(?![\dA-Za-z])"
)
# Brazil's CPF, written 000.000.000-00 (or bare after the word CPF), two check digits mod 11
_CPF = re.compile(
    r"(?<![\d.])(\d{3}\.\d{3}\.\d{3}-\d{2})(?![\d.-]?\d)|\bCPF\b[^\d\n]{0,24}?(\d{11}|\d{9}-\d{2})(?!\d)",
    re.IGNORECASE,
)
# written without spaces, 15 digits make a NIR by chance about once in a hundred: then only after a word
# for it ("sécurité sociale", "NIR", "INSEE", "carte Vitale")
_NIR_WORD = re.compile(r"s[ée]cu|NIR|INSEE|vitale|\bSS\b", re.IGNORECASE)
_SAMPLE_CPFS = {"11144477735": "a sample CPF", "12345678909": "a sample CPF"}
_AADHAAR = re.compile(
    r"\b(?:aadhaa?r|UIDAI|UID)(?:\s+(?:no\.?|number|card))?\W{0,6}([2-9]\d{3}([ -]?)\d{4}\2\d{4})(?![\d])",
    re.IGNORECASE,
)


def _national_ids(text: str) -> Iterator[Finding]:
    spans: set[tuple[int, int]] = set()
    for m in [*_SSN.finditer(text), *_SSN_AFTER_KEYWORD.finditer(text)]:
        group = 0 if m.re is _SSN else 1
        digits = re.sub(r"\D", "", m.group(group))
        area, grp, serial = int(digits[:3]), int(digits[3:5]), int(digits[5:])
        if area in (0, 666) or area >= 900 or grp == 0 or serial == 0 or m.span(group) in spans:
            continue
        spans.add(m.span(group))
        yield _finding("national_id", m, group, "us_ssn", _SAMPLE_SSNS.get(digits, ""))
    for m in _NINO.finditer(text):
        code = m.group(1).replace(" ", "")
        if code.startswith("QQ"):
            yield _finding("national_id", m, 1, "uk_nino", "HMRC's example prefix QQ")
        elif not code.startswith(_NINO_UNUSED_PREFIXES):
            yield _finding("national_id", m, 1, "uk_nino")
    for m in _IBAN.finditer(text):
        iban_span = _iban_span(text, m.start(1))
        if iban_span is not None:
            start, end = iban_span
            code = text[start:end].replace(" ", "")
            reason = "a published example IBAN" if code in _SAMPLE_IBANS else ""
            yield Finding("national_id", start, end, text[start:end], "iban", bool(reason), reason)
    for m in _BSN.finditer(text):
        digits = re.sub(r"\D", "", m.group(1))
        if _eleven_proof(digits):
            reason = "a test BSN" if digits in ("111222333", "123456782") else ""
            yield _finding("national_id", m, 1, "nl_bsn", reason)
    for m in _DNI.finditer(text):
        number = m.group(1).replace("-", "")
        value = int(str("XYZ".find(number[0])) + number[1:]) if number[0] in "XYZ" else int(number)
        if _DNI_LETTERS[value % 23] == m.group(2):
            reason = "a sample DNI" if number + m.group(2) == "12345678Z" else ""
            yield _finding("national_id", m, 0, "es_nie" if number[0] in "XYZ" else "es_dni", reason)
    for m in _AADHAAR.finditer(text):
        digits = re.sub(r"\D", "", m.group(1))
        if verhoeff_valid(digits):
            yield _finding("national_id", m, 1, "in_aadhaar")
    for m in _NIR.finditer(text):
        number = "".join(m.groups()[:6]).replace("2A", "19").replace("2B", "18")
        named = " " in m.group(0) or _NIR_WORD.search(text[max(0, m.start() - 40) : m.start()])
        if named and 97 - int(number) % 97 == int(m.group(7)):
            yield _finding("national_id", m, 0, "fr_nir")
    for m in _CPF.finditer(text):
        group = 1 if m.group(1) else 2
        digits = re.sub(r"\D", "", m.group(group))
        if cpf_valid(digits):
            yield _finding("national_id", m, group, "br_cpf", _SAMPLE_CPFS.get(digits, ""))


def cpf_valid(digits: str) -> bool:
    """Brazil's CPF: each check digit is 10 x (the weighted sum of the digits before it) mod 11 mod 10,
    weights counting down to 2; eleven equal digits are not a CPF.

    >>> cpf_valid("52998224725"), cpf_valid("52998224726")
    (True, False)
    """
    if len(digits) != 11 or len(set(digits)) == 1:
        return False
    values = [int(d) for d in digits]
    for n in (9, 10):
        if sum(v * (n + 1 - i) for i, v in enumerate(values[:n])) * 10 % 11 % 10 != values[n]:
            return False
    return True


def _iban_span(text: str, start: int) -> tuple[int, int] | None:
    """The IBAN starting at `start`: exactly its country's length in characters, in groups of four or
    unspaced, ending at a word boundary and passing mod 97."""
    length = _IBAN_LENGTHS.get(text[start : start + 2])
    if length is None:
        return None
    chars: list[str] = []
    i = start
    spaced = len(text) > start + 4 and text[start + 4] == " "
    while len(chars) < length and i < len(text):
        if text[i] == " " and spaced and len(chars) % 4 == 0 and chars:
            i += 1
            continue
        if not (text[i].isascii() and text[i].isalnum()):
            return None
        chars.append(text[i].upper())
        i += 1
    if len(chars) < length or (i < len(text) and text[i].isalnum()):
        return None
    code = "".join(chars)
    rearranged = code[4:] + code[:4]
    return (start, i) if int("".join(str(int(c, 36)) for c in rearranged)) % 97 == 1 else None


def _eleven_proof(digits: str) -> bool:
    """Dutch BSN: 9x1 + 8x2 + ... + 2x8 - 1x9 is a multiple of 11."""
    if len(digits) != 9 or digits == "000000000":
        return False
    total = sum(int(d) * w for d, w in zip(digits, (9, 8, 7, 6, 5, 4, 3, 2, -1), strict=True))
    return total % 11 == 0


_VERHOEFF_D = (
    (0, 1, 2, 3, 4, 5, 6, 7, 8, 9),
    (1, 2, 3, 4, 0, 6, 7, 8, 9, 5),
    (2, 3, 4, 0, 1, 7, 8, 9, 5, 6),
    (3, 4, 0, 1, 2, 8, 9, 5, 6, 7),
    (4, 0, 1, 2, 3, 9, 5, 6, 7, 8),
    (5, 9, 8, 7, 6, 0, 4, 3, 2, 1),
    (6, 5, 9, 8, 7, 1, 0, 4, 3, 2),
    (7, 6, 5, 9, 8, 2, 1, 0, 4, 3),
    (8, 7, 6, 5, 9, 3, 2, 1, 0, 4),
    (9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
)
_VERHOEFF_P = (
    (0, 1, 2, 3, 4, 5, 6, 7, 8, 9),
    (1, 5, 7, 6, 2, 8, 3, 0, 9, 4),
    (5, 8, 0, 3, 7, 9, 6, 1, 4, 2),
    (8, 9, 1, 6, 0, 4, 3, 5, 2, 7),
    (9, 4, 5, 3, 1, 2, 6, 8, 7, 0),
    (4, 2, 8, 6, 5, 7, 3, 9, 0, 1),
    (2, 7, 9, 3, 8, 0, 6, 4, 1, 5),
    (7, 0, 4, 6, 9, 1, 3, 2, 5, 8),
)


def verhoeff_valid(digits: str) -> bool:
    """Verhoeff's dihedral-group check (Aadhaar's last digit). It catches every single-digit error and
    every swap of adjacent digits, which Luhn does not.

    >>> verhoeff_valid("2363"), verhoeff_valid("2364")
    (True, False)
    """
    check = 0
    for i, d in enumerate(reversed(digits)):
        check = _VERHOEFF_D[check][_VERHOEFF_P[i % 8][int(d)]]
    return check == 0


# --- payment cards ---------------------------------------------------------------------------------------

# unbroken, or in groups (4-4-4-4, 4-6-5, 4-4-4-4-3) with one kind of separator
_CARD = re.compile(r"(?<![\d-])(?:\d{12,19}|\d{4}([ -])\d{3,6}(?:\1\d{1,7}){1,3})(?!\d)")
_TEST_CARDS = frozenset(
    "4111111111111111 4242424242424242 4012888888881881 4222222222222 4000056655665556 4000000000000002 "  # noqa: SIM905
    "4000000000000077 4000000000009995 4000002500003155 4000000000003220 5555555555554444 5105105105105100 "
    "5200828282828210 2223003122003222 5454545454545454 378282246310005 371449635398431 378734493671000 "
    "6011111111111117 6011000990139424 30569309025904 38520000023237 36227206271667 3566002020360505 "
    "3530111333300000 6200000000000005".split()
)


def luhn_valid(digits: str) -> bool:
    """The Luhn check digit of card numbers: double every second digit from the right, sum the digits.

    >>> luhn_valid("4111111111111111"), luhn_valid("4111111111111112")
    (True, False)
    """
    total = 0
    for i, d in enumerate(reversed(digits)):
        n = int(d) * (2 if i % 2 else 1)
        total += n - 9 if n > 9 else n
    return total % 10 == 0


def card_brand(digits: str) -> str | None:
    """The card network whose issuer prefixes (IIN) and lengths `digits` fit, or None."""
    n, p2, p3, p4, p6 = len(digits), int(digits[:2]), int(digits[:3]), int(digits[:4]), int(digits[:6])
    if digits[0] == "4" and n in (13, 16, 19):
        return "visa"
    if (51 <= p2 <= 55 or 2221 <= p4 <= 2720) and n == 16:
        return "mastercard"
    if p2 in (34, 37) and n == 15:
        return "amex"
    if (p4 == 6011 or 644 <= p3 <= 649 or p2 == 65 or 622126 <= p6 <= 622925) and 16 <= n <= 19:
        return "discover"
    if (300 <= p3 <= 305 or p2 in (36, 38, 39)) and 14 <= n <= 19:
        return "diners"
    if 3528 <= p4 <= 3589 and 16 <= n <= 19:
        return "jcb"
    if p2 == 62 and 16 <= n <= 19:
        return "unionpay"
    if 2200 <= p4 <= 2204 and 16 <= n <= 19:
        return "mir"
    if p4 in (5018, 5020, 5038, 5893, 6304, 6759, 6761, 6762, 6763) and 12 <= n <= 19:
        return "maestro"
    return None


def _cards(text: str) -> Iterator[Finding]:
    for m in _CARD.finditer(text):
        before, after = text[max(0, m.start() - 2) : m.start()], text[m.end() : m.end() + 2]
        if m.group(1) and (re.fullmatch(r"\d[ -]", before) or re.fullmatch(r"[ -]\d", after)):
            continue  # some groups out of a longer run of groups
        digits = re.sub(r"\D", "", m.group(0))
        brand = card_brand(digits)
        if brand and luhn_valid(digits):
            reason = "a public test card number" if digits in _TEST_CARDS else ""
            yield _finding("payment_card", m, 0, f"luhn:{brand}", reason)


# --- IP addresses ----------------------------------------------------------------------------------------

_IPV4 = re.compile(r"(?<![\w.])(\d{1,3}(?:\.\d{1,3}){3})(?!\.?\d)(?![\w-])")
_IPV6 = re.compile(
    r"(?<![\w:.])((?:[0-9A-Fa-f]{0,4}:){2,7}(?:[0-9A-Fa-f]{1,4}|\d{1,3}(?:\.\d{1,3}){3})?)(?![\w:])"
)
_VERSION_BEFORE = re.compile(r"\bv$|\b(?:version|ver|release|build|firmware)\b", re.IGNORECASE)
_DOC_NETS = tuple(
    ipaddress.ip_network(n)
    for n in ("192.0.2.0/24", "198.51.100.0/24", "203.0.113.0/24", "2001:db8::/32", "3fff::/20")
)


def _ip_addresses(text: str) -> Iterator[Finding]:
    for pattern, detector in ((_IPV4, "ipv4"), (_IPV6, "ipv6")):
        for m in pattern.finditer(text):
            if detector == "ipv6" and (
                m.group(1).count(":") < 2 or not re.search(r"[0-9A-Fa-f]", m.group(1))
            ):
                continue
            try:
                address = ipaddress.ip_address(m.group(1))
            except ValueError:
                continue  # 999.1.1.1, 10:30:00, a MAC address
            if _VERSION_BEFORE.search(text[max(0, m.start() - 25) : m.start()]):
                continue
            reason = ""
            if any(address in net for net in _DOC_NETS):
                reason = "documentation range (RFC 5737/3849)"
            elif address.is_private or address.is_loopback or address.is_link_local or address.is_unspecified:
                reason = "private or local address: identifies no one outside its network"
            elif address.is_multicast or address.is_reserved:
                reason = "reserved or multicast address"
            yield _finding("ip_address", m, 1, detector, reason)


# --- dates of birth --------------------------------------------------------------------------------------

_DOB_KEYWORD = re.compile(
    r"\b(?:born|d\.?o\.?b|date\s+of\s+birth|birth\s*date|birthday|b-?day|geboren|geb\.|n[ée]e?\s+le|"
    r"fecha\s+de\s+nacimiento)(?![a-z])",
    re.IGNORECASE,
)
_MONTHS = ["jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec"]
_MONTH = r"(?P<mon>jan|feb|mar|apr|may|jun|jul|aug|sept?|oct|nov|dec)[a-z]*\.?"
_DATE_FORMS = (
    re.compile(r"(?<!\d)(?P<y>(?:19|20)\d{2})[-/.](?P<m>\d{1,2})[-/.](?P<d>\d{1,2})(?!\d)"),
    re.compile(r"(?<!\d)(?P<a>\d{1,2})(?P<sep>[-/.])(?P<b>\d{1,2})(?P=sep)(?P<y>\d{4}|\d{2})(?!\d)"),
    re.compile(
        rf"(?<!\d)(?P<d>\d{{1,2}})(?:st|nd|rd|th)?(?:\s+of)?[\s-]+{_MONTH}[\s,-]+(?P<y>\d{{4}})(?!\d)", re.I
    ),
    re.compile(rf"\b{_MONTH}\s+(?P<d>\d{{1,2}})(?:st|nd|rd|th)?,?\s+(?P<y>\d{{4}})(?!\d)", re.I),
)


def _dates_of_birth(text: str) -> Iterator[Finding]:
    for keyword in _DOB_KEYWORD.finditer(text):
        window_start = keyword.end()
        window = text[window_start : window_start + 40]
        best: re.Match[str] | None = None
        for form in _DATE_FORMS:
            m = form.search(window)
            if m and _calendar_date(m) and _same_phrase(window[: m.start()]):
                best = m if best is None or m.start() < best.start() else best
        if best is not None:
            start, end = window_start + best.start(), window_start + best.end()
            yield Finding("date_of_birth", start, end, text[start:end], "date_after_keyword")


def _same_phrase(gap: str) -> bool:
    """The words between a keyword and a date: a few, and no sentence end ("Born to ride! Order placed
    2024-03-15" is no birth date; "born in Leeds on 15 March 1984" is)."""
    return len(gap.split()) <= 4 and not re.search(r"\w[.!?;]\s", gap)


def _calendar_date(m: re.Match[str]) -> bool:
    """A real day between 1900 and today (day-month or month-day, whichever fits)."""
    parts = m.groupdict()
    year = int(parts["y"])
    today = datetime.date.today()
    if year < 100:
        year += 2000 if year <= today.year % 100 else 1900
    if parts.get("mon"):
        candidates = [(_MONTHS.index(parts["mon"][:3].lower()) + 1, int(parts["d"]))]
    elif parts.get("a"):
        a, b = int(parts["a"]), int(parts["b"])
        candidates = [(b, a), (a, b)]
    else:
        candidates = [(int(parts["m"]), int(parts["d"]))]
    for month, day in candidates:
        try:
            if datetime.date(1900, 1, 1) <= datetime.date(year, month, day) <= today:
                return True
        except ValueError:
            continue
    return False


# --- medical record numbers ------------------------------------------------------------------------------

_MEDICAL_KEYWORD = re.compile(
    r"\b(?:(?P<nhs>NHS|CHI)(?:\s+(?:number|no\.?|#))?|MRN|medical\s+record(?:\s+(?:number|no\.?|#))?|"
    r"patient\s+(?:id|identifier|number|no\.?|#)|hospital\s+(?:number|no\.?)|chart\s+(?:number|no\.?|#)|"
    r"health\s+record\s+(?:number|no\.?))(?![a-z])",
    re.IGNORECASE,
)
_MEDICAL_ID = re.compile(
    r"[\s:#.=-]*(?:is\s+)?((?=(?:[A-Za-z-]*\d){4})[A-Za-z0-9][A-Za-z0-9-]{3,19})(?![\w-])"
)
_NHS_ID = re.compile(r"[\s:#.=-]*(?:is\s+)?(\d{3}[ -]?\d{3}[ -]?\d{4})(?![\d-])")


def nhs_number_valid(digits: str) -> bool:
    """NHS number: weights 10..2 on the first nine digits; 11 minus the sum mod 11 (11 -> 0, 10 never
    issued) is the tenth digit.

    >>> nhs_number_valid("9434765919"), nhs_number_valid("9434765918")
    (True, False)
    """
    if len(digits) != 10:
        return False
    check = 11 - sum(int(d) * w for d, w in zip(digits[:9], range(10, 1, -1), strict=True)) % 11
    return check != 10 and (0 if check == 11 else check) == int(digits[9])


def _medical_records(text: str) -> Iterator[Finding]:
    for keyword in _MEDICAL_KEYWORD.finditer(text):
        rest = text[keyword.end() : keyword.end() + 40]
        if keyword.group("nhs"):
            m = _NHS_ID.match(rest)
            if m is None:
                continue
            digits = re.sub(r"\D", "", m.group(1))
            if not nhs_number_valid(digits):
                continue
            reason = ""
            if digits.startswith("999"):
                reason = "NHS test number range (999...)"
            elif digits == "9434765919":
                reason = "the NHS Data Dictionary's example number"
            detector = "nhs_number"
        else:
            m = _MEDICAL_ID.match(rest)
            if m is None:
                continue
            reason, detector = "", "id_after_keyword"
        start = keyword.end() + m.start(1)
        yield Finding(
            "medical_record", start, start + len(m.group(1)), m.group(1), detector, bool(reason), reason
        )
