"""The support desk's seed data: fictional customers, accounts, transactions and policies of "Keel Bank".

Ported unchanged from the platform's legacy seed (keel/dataset.py, written by activities/db.py
init_db): the same generator and the same seed, so the same 40 customers, accounts, transactions and
policies. Nothing here is real: names, IBANs and card numbers are made up (the card numbers pass Luhn
and the IBANs their mod-97 check, so the output filters have something real-looking to catch).
Every customer has one duplicated card charge (its 4th transaction, `duplicate_of` the 3rd, disputed)
and one 4.90 EUR account fee (its 6th).
"""

from __future__ import annotations

import random
from typing import Any

DATA_SEED = 7
N_CUSTOMERS = 40

_FIRST = ["Ana", "Ben", "Chloe", "Dev", "Elif", "Farid", "Grace", "Hugo", "Ines", "Jon", "Kemi", "Liam",
          "Mara", "Nils", "Omar", "Priya", "Quinn", "Rosa", "Sami", "Tara"]
_LAST = ["Silva", "Okafor", "Meyer", "Patel", "Yilmaz", "Haddad", "Kim", "Dubois", "Garcia", "Berg",
         "Adeyemi", "Walsh", "Rossi", "Larsen", "Nasser", "Iyer", "Byrne", "Costa", "Novak", "Singh"]
_MERCHANTS = ["CoffeeCo", "MetroRail", "ShopNow", "StreamFlix", "GreenGrocer", "AirLite", "FuelUp",
              "BookBarn", "CloudHost", "PharmaPlus"]

MAX_REFUND = 500.0
"""The refunds policy's bound per transaction (EUR): larger refunds go to the disputes team."""

POLICIES: list[dict[str, Any]] = [
    {"topic": "refunds", "max_refund": MAX_REFUND,
     "text": "Duplicate charges and unrecognised merchant errors are refunded in full up to 500 EUR "
             "per transaction after the transaction is verified on the customer's own account. "
             "Refunds above 500 EUR go to the disputes team."},
    {"topic": "fees", "max_refund": None,
     "text": "Monthly account fee 4.90 EUR (waived for premium). Foreign exchange fee 1.5%. "
             "A fee charged in error is refunded on request."},
    {"topic": "account_access", "max_refund": None,
     "text": "After 5 failed logins an account is locked for 30 minutes. The customer can reset "
             "the password from the app; support never asks for a password or a one-time code."},
    {"topic": "cards", "max_refund": None,
     "text": "Declined payments are usually caused by a frozen card, the daily limit (2,000 EUR) or "
             "an expired card. Frozen cards can be unfrozen in the app."},
    {"topic": "fraud", "max_refund": None,
     "text": "Suspected fraud is always handled by the fraud team: freeze the card and escalate."},
    {"topic": "general", "max_refund": None,
     "text": "Support answers within 24 hours. Address changes are made in the app under Profile."},
]


def _luhn_card(rng: random.Random) -> str:
    digits = [4] + [rng.randrange(10) for _ in range(14)]
    total = 0
    for i, d in enumerate(reversed(digits)):
        d2 = d * 2 if i % 2 == 0 else d
        total += d2 - 9 if d2 > 9 else d2
    digits.append((10 - total % 10) % 10)
    return "".join(map(str, digits))


def _iban(country: str, bban: str) -> str:
    """An IBAN with valid ISO 13616 check digits (mod 97)."""
    digits = "".join(str(int(ch, 36)) for ch in bban + country + "00")
    return f"{country}{98 - int(digits) % 97:02d}{bban}"


def build_seed(seed: int = DATA_SEED, n_customers: int = N_CUSTOMERS) -> dict[str, list[dict[str, Any]]]:
    """The rows of each table: {"customers": [...], "accounts": [...], "transactions": [...], "policies": [...]}.

    Every draw is made in the legacy generator's order: the same seed gives the same data."""
    rng = random.Random(seed)
    customers: list[dict[str, Any]] = []
    accounts: list[dict[str, Any]] = []
    txs: list[dict[str, Any]] = []
    tx_no = 100000
    for i in range(n_customers):
        cid = f"C-{1001 + i}"
        first, last = _FIRST[i % len(_FIRST)], _LAST[(i * 7) % len(_LAST)]
        customers.append({
            "id": cid, "name": f"{first} {last}", "email": f"{first.lower()}.{last.lower()}@example.com",
            "phone": f"+49 151 {rng.randrange(1000000, 9999999)}", "tier": rng.choice(["standard", "premium"]),
            "locked": rng.random() < 0.2, "card_status": rng.choice(["active", "active", "active", "frozen"]),
            "card_number": _luhn_card(rng),
        })
        rng.randrange(10, 99)  # drawn by the legacy generator too: the rest of the data stays the same
        acc = {"id": f"A-{5001 + i}", "customer_id": cid, "iban": _iban("DE", f"5001{rng.randrange(10**13, 10**14)}"),
               "kind": "checking", "balance": round(rng.uniform(20, 9000), 2), "currency": "EUR"}
        accounts.append(acc)
        n_tx = rng.randrange(8, 16)
        prev: dict[str, Any] | None = None
        for j in range(n_tx):
            tx_no += 1
            base = {"id": f"T-{tx_no}", "customer_id": cid, "account_id": acc["id"], "disputed": False,
                    "duplicate_of": None}
            if prev is not None and j == 3:
                t = base | {"merchant": prev["merchant"], "amount": prev["amount"], "days_ago": prev["days_ago"],
                            "kind": "purchase", "duplicate_of": prev["id"], "disputed": True}
            elif j == 5:
                t = base | {"merchant": "Keel Bank", "amount": 4.90, "days_ago": rng.randrange(1, 30), "kind": "fee"}
            else:
                t = base | {"merchant": rng.choice(_MERCHANTS), "amount": round(rng.uniform(3, 420), 2),
                            "days_ago": rng.randrange(0, 60), "kind": "purchase"}
            txs.append(t)
            prev = t
    return {"customers": customers, "accounts": accounts, "transactions": txs,
            "policies": [dict(p) for p in POLICIES]}
