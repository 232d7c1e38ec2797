"""Personal-data detectors: true positives with hand-checked checksums, placeholders flagged fictional,
and the look-alikes that must stay out (order numbers, prices, ISBNs, timestamps, versions, bad checks)."""

from __future__ import annotations

import pytest

from tunery.safety.pii import (
    CATEGORIES,
    card_brand,
    find_personal_data,
    luhn_valid,
    nhs_number_valid,
    redact,
    verhoeff_valid,
)


def found(text: str) -> list[tuple[str, str, bool]]:
    return [(f.category, f.text, f.fictional) for f in find_personal_data(text)]


# Each case: text, then (category, matched text, fictional) for every finding, in order.
TRUE_POSITIVES = [
    ("Write to jane.doe@gmail.com today", [("email", "jane.doe@gmail.com", False)]),
    ("cc: o'neil+bikes@mail.co.uk.", [("email", "o'neil+bikes@mail.co.uk", False)]),
    ("'jane@mail.com' is quoted", [("email", "jane@mail.com", False)]),
    ("Call me on (415) 867-5309 tonight", [("phone", "(415) 867-5309", False)]),
    ("my number is 4158675309", [("phone", "4158675309", False)]),
    ("London office +44 20 8123 4567", [("phone", "+44 20 8123 4567", False)]),
    ("mobile 07911 123456", [("phone", "07911 123456", False)]),
    ("SSN 536-22-1234 on file", [("national_id", "536-22-1234", False)]),
    ("social security number: 536 22 1234", [("national_id", "536 22 1234", False)]),
    ("NI number AB 12 34 56 C", [("national_id", "AB 12 34 56 C", False)]),
    # 237158462: 2x9+3x8+7x7+1x6+5x5+8x4+4x3+6x2 = 178 = 16x11 + 2, minus the last digit 2: 11-proof
    ("BSN 237158462", [("national_id", "237158462", False)]),
    # 87654321 mod 23 = 10 -> X;  NIE X1234567 -> 01234567 mod 23 = 19 -> L
    (
        "DNI 87654321X, NIE X1234567L",
        [("national_id", "87654321X", False), ("national_id", "X1234567L", False)],
    ),
    ("IBAN DE44 5001 0517 5407 3249 31", [("national_id", "DE44 5001 0517 5407 3249 31", False)]),
    # 4539 1488 0343 6467: doubled digits sum 37, the others 43; 80 is a multiple of 10
    ("card 4539 1488 0343 6467 exp 11/27", [("payment_card", "4539 1488 0343 6467", False)]),
    ("card 4539-1488-0343-6467", [("payment_card", "4539-1488-0343-6467", False)]),
    ("from 81.2.69.160 at noon", [("ip_address", "81.2.69.160", False)]),
    ("client 2606:4700:4700::1111 connected", [("ip_address", "2606:4700:4700::1111", False)]),
    ("DOB: 03/15/1984", [("date_of_birth", "03/15/1984", False)]),
    ("she was born on 15 March 1984 in Leeds", [("date_of_birth", "15 March 1984", False)]),
    ("Date of birth 1984-03-15.", [("date_of_birth", "1984-03-15", False)]),
    ("his birthday is March 15th, 1985", [("date_of_birth", "March 15th, 1985", False)]),
    ("d.o.b. 15.03.84", [("date_of_birth", "15.03.84", False)]),
    ("born in Leeds on 15 March 1984", [("date_of_birth", "15 March 1984", False)]),
    ("DOB (MM/DD/YYYY): 03/15/1984", [("date_of_birth", "03/15/1984", False)]),
    ("MRN: 00123456", [("medical_record", "00123456", False)]),
    ("patient ID A-4471290 admitted", [("medical_record", "A-4471290", False)]),
    # 4x10+0x9+1x8+0x7+2x6+3x5+2x4+1x3+3x2 = 92, 92 mod 11 = 4, 11 - 4 = 7: the last digit
    ("NHS number 401 023 2137", [("medical_record", "401 023 2137", False)]),
]

# The same kinds of data as customers of other countries write them
OTHER_COUNTRIES = [
    ("Llámame al 612 345 678, gracias", [("phone", "612 345 678", False)]),
    ("mi móvil: 612 34 56 78", [("phone", "612 34 56 78", False)]),
    ("Ligue para 912 345 678 amanhã", [("phone", "912 345 678", False)]),
    ("Appelez-moi au 06 12 34 56 78 svp", [("phone", "06 12 34 56 78", False)]),
    ("Handy: 0151 23456789", [("phone", "0151 23456789", False)]),
    ("Meu celular é (11) 91234-5678", [("phone", "(11) 91234-5678", False)]),
    ("bel me op 06 12345678", [("phone", "06 12345678", False)]),
    ("Teléfono del cliente: 612 345 678", [("phone", "612 345 678", False)]),
    ("Tel 0171 1234567 / 0172 7654321", [("phone", "0171 1234567", False), ("phone", "0172 7654321", False)]),
    # 1840375123456 mod 97 = 7, 97 - 7 = 90; Corsica's 2A counts as 19: 2920519123456 mod 97 = 69 -> 28
    (
        "sécurité sociale : 1 84 03 75 123 456 90 ; NIR 292052A12345628",
        [("national_id", "1 84 03 75 123 456 90", False), ("national_id", "292052A12345628", False)],
    ),
    # 5x10+2x9+9x8+9x7+8x6+2x5+2x4+4x3+7x2 = 295, 2950 mod 11 = 2; then with 2, x11..x2: 347 -> 5
    ("CPF 529.982.247-25", [("national_id", "529.982.247-25", False)]),
    ("meu CPF: 52998224725", [("national_id", "52998224725", False)]),
    ("meu cpf é 52998224725", [("national_id", "52998224725", False)]),
    ("numéro de sécu 184037512345690", [("national_id", "184037512345690", False)]),
    ("CPF de exemplo 123.456.789-09", [("national_id", "123.456.789-09", True)]),
]

PLACEHOLDERS = [
    ("mail support@northwind-bikes.example", [("email", "support@northwind-bikes.example", True)]),
    # an organisation's line by its numbering plan: toll-free where every reading of it is (a number
    # written without its country code), any service type with it
    (
        "Call our support line 1-800-273-8255 or me at +1 415 555 2671",
        [("phone", "1-800-273-8255", True), ("phone", "+1 415 555 2671", False)],
    ),
    (
        "Seelsorge 0800 111 0 111, +44 300 123 3000",
        [("phone", "0800 111 0 111", True), ("phone", "+44 300 123 3000", True)],
    ),
    # ... but not where a country the detector reads it as takes it for a person's: a German, Italian or
    # Austrian landline after a word for a phone; a British shared-cost or UAN reading of a German one
    ("Telefonseelsorge: 0800 111 0 111", [("phone", "0800 111 0 111", False)]),
    (
        "Tel. 030 12345678 or 0911 1234567",
        [("phone", "030 12345678", False), ("phone", "0911 1234567", False)],
    ),
    ("Meu telefone: (83) 3221-4567", [("phone", "(83) 3221-4567", False)]),
    (
        "Ring 0800 123 4567, 0845 46 47 or 0300 123 3000",
        [("phone", "0800 123 4567", True), ("phone", "0845 46 47", False), ("phone", "0300 123 3000", False)],
    ),
    (
        "a@example.com b@x.example.org c@foo.test d@y.invalid e@h.localhost",
        [
            ("email", x, True)
            for x in ("a@example.com", "b@x.example.org", "c@foo.test", "d@y.invalid", "e@h.localhost")
        ],
    ),  # fmt: skip
    (
        "write to support@acme.io or no-reply@acme.io",
        [("email", "support@acme.io", True), ("email", "no-reply@acme.io", True)],
    ),
    ("call +1 (555) 010-4477", [("phone", "+1 (555) 010-4477", True)]),
    ("call (212) 555-0123 or 555-0147", [("phone", "(212) 555-0123", True), ("phone", "555-0147", True)]),
    (
        "ring 020 7946 0958 or +44 7700 900123",
        [("phone", "020 7946 0958", True), ("phone", "+44 7700 900123", True)],
    ),
    ("test card 4111 1111 1111 1111", [("payment_card", "4111 1111 1111 1111", True)]),
    ("amex 378282246310005", [("payment_card", "378282246310005", True)]),
    (
        "hosts 192.0.2.1 198.51.100.7 203.0.113.9 2001:db8::1",
        [("ip_address", x, True) for x in ("192.0.2.1", "198.51.100.7", "203.0.113.9", "2001:db8::1")],
    ),  # fmt: skip
    (
        "router 192.168.1.1, localhost 127.0.0.1",
        [("ip_address", "192.168.1.1", True), ("ip_address", "127.0.0.1", True)],
    ),
    ("SSN 078-05-1120", [("national_id", "078-05-1120", True)]),
    ("NINO QQ 12 34 56 C", [("national_id", "QQ 12 34 56 C", True)]),
    ("IBAN GB82 WEST 1234 5698 7654 32", [("national_id", "GB82 WEST 1234 5698 7654 32", True)]),
    ("DNI 12345678Z", [("national_id", "12345678Z", True)]),
    # 9x10+4x9+3x8+4x7+7x6+6x5+5x4+9x3+1x2 = 299, 299 mod 11 = 2, 11 - 2 = 9
    ("NHS no. 943 476 5919", [("medical_record", "943 476 5919", True)]),
]

LOOK_ALIKES = [
    "Order #4158675309 shipped",
    "Your order number is 2125557123.",
    "Total: $1,234.56 (EUR 1.234,56), 12,345,678 units",
    "ISBN 978-3-16-148410-0, ISBN-13: 9783161484100",
    "Logged at 2024-03-15T10:30:00Z (epoch 1710498600, ms 1710498600123)",
    "Upgrade from version 1.2.3 to 2.4.1.3; build 10.0.0.1; 1.2.3.4.5; 10.0.0.1-beta",
    "SSNs 000-12-3456 666-12-3456 912-12-3456 123-00-4567 123-45-0000",
    "card 4539 1488 0343 6468 (one digit off)",
    "IBAN DE44 5001 0517 5407 3249 32 (bad check digits)",
    "BSN 237158463",
    "DNI 87654321A",
    "NHS number 401 023 2138",
    "NINO GB 12 34 56 A, DA 12 34 56 A",
    "born in 1984; born on 31/02/1990; DOB 2099-01-01",
    "Born to ride! Order placed 2024-03-15",
    "Open 9-5, ext. 1234, 3.14159265358979",
    "FedEx 7489 2838 2030, UPS 1Z999AA10123456784",
    "between 1999-2004 and in 2019-2023",
    "times 10:30:00 and MAC 00:1a:2b:3c:4d:5e, std::vector",
    "patient id is pending; MRN unknown",
    "999.1.1.1 and 01.02.03.04",
    "exp 11/26, cvv 448",
    "Número de pedido: 612 345 678",
    "pedido 612345678 enviado",
    "commande n° 0612345678",
    "Bestellnummer 0151 23456789",
    "Rechnung vom 03.04.2024, Betrag 1.234,56 EUR, Kundennummer 0151 2345678",
    "sécurité sociale 1 84 03 75 123 456 91 (bad key)",
    "CPF 529.982.247-26, 111.111.111-11",
    "Preço R$ 612.345,67 ou 912.345,67",
    # other countries' number plans take these too; without a word for a phone they are not read so
    "size 826018159 bytes, user_id=812345678",
    '{"order_id": 712345678, "status": "shipped"}',
    "612 345 678 € de chiffre d'affaires; SIREN 732 829 320; Total 912 345 678",
    "commit b888b29826bb53dc531437e723738383d8339b56",
    "request_id=56363b4b-e779-4470-bb7d-ae0495918694, etag b53b3a3d6ab90ce0268229151c9bde11",
    "Your tracking number is RR712345678ES",
    "Kunden-Nr. 0123456789, Art.-Nr. 0612345678, Auftragsnummer 0612345678",
    "Entidade: 11249 Referência: 912 345 678 Valor: 49,90 €",
    "Bestellt am 03.04.2024 14:30 Uhr; Öffnungszeiten 08.00-12.00 14.00-18.00",
    "Pedido 202403150000028, Tracking 123649631885057",
    "btw-nummer NL812345678B01, BTW BE 0475.123.456",
    "If that starts after she opens the letter, she can always call +1 (555) 010",  # cut short by a model
    "Handy: +1 (555) 010",
    "(800) 010-4477 offer applies after",  # a model's US-style number: not a British one either
]


@pytest.mark.parametrize(("text", "expected"), TRUE_POSITIVES + OTHER_COUNTRIES + PLACEHOLDERS)
def test_findings(text: str, expected: list[tuple[str, str, bool]]) -> None:
    assert found(text) == expected


@pytest.mark.parametrize("text", LOOK_ALIKES)
def test_look_alikes_are_not_personal_data(text: str) -> None:
    assert found(text) == []


def test_spans_and_reasons() -> None:
    text = "DOB: 03/15/1984, mail a@example.com"
    dob, email = find_personal_data(text)
    assert text[dob.start : dob.end] == "03/15/1984" and dob.detector == "date_after_keyword"
    assert email.reason.startswith("reserved domain") and not dob.reason
    card = find_personal_data("4111111111111111")[0]
    assert (card.detector, card.reason) == ("luhn:visa", "a public test card number")


def test_the_stricter_detector_keeps_an_overlapping_span() -> None:
    # an SSN after "patient ID" is both an SSN and an id after a medical keyword: the SSN check wins
    assert found("patient ID 536-22-1234") == [("national_id", "536-22-1234", False)]


def test_redact_masks_personal_data_and_keeps_placeholders() -> None:
    text = "Jane (jane.doe@gmail.com, 415-867-5309) or support@shop.example; card 4539148803436467."
    assert redact(text) == "Jane ([EMAIL], [PHONE]) or support@shop.example; card [PAYMENT_CARD]."
    assert (
        redact(text, ["email"])
        == "Jane ([EMAIL], 415-867-5309) or support@shop.example; card 4539148803436467."
    )
    assert redact("nothing here") == "nothing here"
    with pytest.raises(ValueError, match="unknown categories"):
        redact(text, ["name"])
    every = (
        "a@gmail.com (415) 867-5309 SSN 536-22-1234 4539148803436467 81.2.69.160 DOB 1984-03-15 MRN 00123456"
    )
    assert redact(every).split() == [
        "[EMAIL]", "[PHONE]", "SSN", "[NATIONAL_ID]", "[PAYMENT_CARD]", "[IP_ADDRESS]", "DOB",
        "[DATE_OF_BIRTH]", "MRN", "[MEDICAL_RECORD]",
    ]  # fmt: skip
    assert {f.category for f in find_personal_data(every)} == set(CATEGORIES)


def test_checksums_by_hand() -> None:
    assert luhn_valid("79927398713") and not luhn_valid("79927398710")  # the textbook Luhn example
    assert verhoeff_valid("2363") and not verhoeff_valid("2336")  # Verhoeff's: 236 -> check digit 3
    aadhaar = "234567890124"
    assert verhoeff_valid(aadhaar)
    for i in range(len(aadhaar)):  # every single-digit error is caught
        for d in "0123456789":
            if d != aadhaar[i]:
                assert not verhoeff_valid(aadhaar[:i] + d + aadhaar[i + 1 :])
    assert nhs_number_valid("9434765919") and not nhs_number_valid("9434765910")
    assert not nhs_number_valid("1000000010")  # check value 10 is never issued
    assert found("Aadhaar 2345 6789 0124") == [("national_id", "2345 6789 0124", False)]
    assert found("random 2345 6789 0124") == []  # 12 grouped digits need the keyword (FedEx uses them)


def test_card_brands() -> None:
    assert card_brand("4111111111111111") == "visa" and card_brand("4222222222222") == "visa"
    assert card_brand("5555555555554444") == "mastercard" and card_brand("2223003122003222") == "mastercard"
    assert card_brand("378282246310005") == "amex" and card_brand("37828224631000") is None  # 14 digits
    assert card_brand("6011111111111117") == "discover" and card_brand("3530111333300000") == "jcb"
    assert card_brand("9783161484100") is None  # an ISBN
    # Luhn-valid but no network issues this prefix
    assert luhn_valid("1234567812345670") and found("1234 5678 1234 5670") == []


def test_plain_text_is_fast_path() -> None:
    assert find_personal_data("") == [] and find_personal_data("Thanks, that helped a lot!") == []


def test_hostile_text_takes_linear_time() -> None:
    """ "a'a'a'...a' @" made the e-mail pattern try a match from every apostrophe to the end: quadratic,
    minutes for a moderation request of a few hundred KB, holding the GIL. In a child process with 60 s
    of CPU, 500 KB of each must finish (linear: well under a second; quadratic: hours)."""
    import resource
    import subprocess
    import sys

    code = (
        "from tunery.safety.pii import find_personal_data\n"
        "for unit in (\"a'\", 'a.', \"a'-\", 'x@a-', '1/', 'MRN 1234 '):\n"
        "    find_personal_data(unit * (500_000 // len(unit)) + ' @')\n"
        "print('done')\n"
    )

    def cpu_limit() -> None:
        resource.setrlimit(resource.RLIMIT_CPU, (60, 60))

    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, preexec_fn=cpu_limit, timeout=600
    )
    assert out.stdout.strip() == "done", out.stderr[-2000:]
