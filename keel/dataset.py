"""Synthetic fintech data: customers, accounts, transactions, policies, and sample tickets.

Generated from an explicit seed so the database seed, the sample tickets and the tests agree.
Nothing here is real: names, IBANs and card numbers are made up (card numbers pass Luhn so the
PII filter has something real-looking to catch).
"""

from __future__ import annotations

import random

from pydantic import BaseModel

DATA_SEED = 7
N_CUSTOMERS = 40

_FIRST = ["Ana", "Ben", "Chloe", "Dev", "Elif", "Farid", "Grace", "Hugo", "Ines", "Jon", "Kemi", "Liam",
          "Mara", "Nils", "Omar", "Priya", "Quinn", "Rosa", "Sami", "Tara"]
_LAST = ["Silva", "Okafor", "Meyer", "Patel", "Yilmaz", "Haddad", "Kim", "Dubois", "Garcia", "Berg",
         "Adeyemi", "Walsh", "Rossi", "Larsen", "Nasser", "Iyer", "Byrne", "Costa", "Novak", "Singh"]
_MERCHANTS = ["CoffeeCo", "MetroRail", "ShopNow", "StreamFlix", "GreenGrocer", "AirLite", "FuelUp",
              "BookBarn", "CloudHost", "PharmaPlus"]


class Customer(BaseModel):
    id: str
    name: str
    email: str
    phone: str
    tier: str
    locked: bool
    card_status: str
    card_number: str


class Account(BaseModel):
    id: str
    customer_id: str
    iban: str
    kind: str
    balance: float
    currency: str = "EUR"


class Transaction(BaseModel):
    id: str
    customer_id: str
    account_id: str
    merchant: str
    amount: float
    days_ago: int
    kind: str
    """purchase | fee | refund"""
    disputed: bool = False
    duplicate_of: str | None = None


class PolicyDoc(BaseModel):
    topic: str
    text: str
    max_refund: float | None = None


POLICIES = [
    PolicyDoc(topic="refunds", max_refund=500.0,
              text="Duplicate charges and unrecognised merchant errors are refunded in full up to 500 EUR "
                   "per transaction after the transaction is verified on the customer's own account. "
                   "Refunds above 500 EUR go to the disputes team."),
    PolicyDoc(topic="fees",
              text="Monthly account fee 4.90 EUR (waived for premium). Foreign exchange fee 1.5%. "
                   "A fee charged in error is refunded on request."),
    PolicyDoc(topic="account_access",
              text="After 5 failed logins an account is locked for 30 minutes. The customer can reset "
                   "the password from the app; support never asks for a password or a one-time code."),
    PolicyDoc(topic="cards",
              text="Declined payments are usually caused by a frozen card, the daily limit (2,000 EUR) or "
                   "an expired card. Frozen cards can be unfrozen in the app."),
    PolicyDoc(topic="fraud",
              text="Suspected fraud is always handled by the fraud team: freeze the card and escalate."),
    PolicyDoc(topic="general",
              text="Support answers within 24 hours. Address changes are made in the app under Profile."),
]


def _luhn_card(rng: random.Random) -> str:
    digits = [4] + [rng.randrange(10) for _ in range(14)]
    total = 0
    for i, d in enumerate(reversed(digits)):
        d2 = d * 2 if i % 2 == 0 else d
        total += d2 - 9 if d2 > 9 else d2
    digits.append((10 - total % 10) % 10)
    return "".join(map(str, digits))


class Dataset(BaseModel):
    customers: list[Customer]
    accounts: list[Account]
    transactions: list[Transaction]
    policies: list[PolicyDoc]


def _iban(country: str, bban: str) -> str:
    """An IBAN with valid ISO 13616 check digits (mod 97), so the PII filter's checksum recognises it."""
    digits = "".join(str(int(ch, 36)) for ch in bban + country + "00")
    return f"{country}{98 - int(digits) % 97:02d}{bban}"


def build_dataset(seed: int = DATA_SEED, n_customers: int = N_CUSTOMERS) -> Dataset:
    rng = random.Random(seed)
    customers, accounts, txs = [], [], []
    tx_no = 100000
    for i in range(n_customers):
        cid = f"C-{1001 + i}"
        first, last = _FIRST[i % len(_FIRST)], _LAST[(i * 7) % len(_LAST)]
        customers.append(Customer(
            id=cid, name=f"{first} {last}", email=f"{first.lower()}.{last.lower()}@example.com",
            phone=f"+49 151 {rng.randrange(1000000, 9999999)}", tier=rng.choice(["standard", "premium"]),
            locked=rng.random() < 0.2, card_status=rng.choice(["active", "active", "active", "frozen"]),
            card_number=_luhn_card(rng),
        ))
        rng.randrange(10, 99)  # once random check digits; still drawn, so the rest of the data is unchanged
        acc = Account(id=f"A-{5001 + i}", customer_id=cid, iban=_iban("DE", f"5001{rng.randrange(10**13, 10**14)}"),
                      kind="checking", balance=round(rng.uniform(20, 9000), 2))
        accounts.append(acc)
        n_tx = rng.randrange(8, 16)
        prev: Transaction | None = None
        for j in range(n_tx):
            tx_no += 1
            if prev is not None and j == 3:
                t = Transaction(id=f"T-{tx_no}", customer_id=cid, account_id=acc.id, merchant=prev.merchant,
                                amount=prev.amount, days_ago=prev.days_ago, kind="purchase",
                                duplicate_of=prev.id, disputed=True)
            elif j == 5:
                t = Transaction(id=f"T-{tx_no}", customer_id=cid, account_id=acc.id, merchant="Keel Bank",
                                amount=4.90, days_ago=rng.randrange(1, 30), kind="fee")
            else:
                t = Transaction(id=f"T-{tx_no}", customer_id=cid, account_id=acc.id,
                                merchant=rng.choice(_MERCHANTS), amount=round(rng.uniform(3, 420), 2),
                                days_ago=rng.randrange(0, 60), kind="purchase")
            txs.append(t)
            prev = t
    return Dataset(customers=customers, accounts=accounts, transactions=txs, policies=POLICIES)


class SampleTicket(BaseModel):
    ticket_id: str
    customer_id: str
    text: str
    category: str
    """The category a correct agent finds."""
    expected_route: str
    """reply | human: where a correct agent sends it under the default policy."""


def sample_tickets(n: int, seed: int = 0, dataset: Dataset | None = None) -> list[SampleTicket]:
    """n tickets over the synthetic customers, every category represented, with known answers."""
    ds = dataset or build_dataset()
    rng = random.Random(f"tickets:{seed}")
    by_customer: dict[str, list[Transaction]] = {}
    for t in ds.transactions:
        by_customer.setdefault(t.customer_id, []).append(t)
    kinds = ["refund_request", "billing_question", "account_access", "card_issue", "fraud_report",
             "general_inquiry", "refund_request", "card_issue"]
    out = []
    for i in range(n):
        c = ds.customers[rng.randrange(len(ds.customers))]
        txs = by_customer[c.id]
        kind = kinds[i % len(kinds)]
        dup = next(t for t in txs if t.duplicate_of)
        fee = next(t for t in txs if t.kind == "fee")
        other = rng.choice([t for t in txs if t.kind == "purchase" and not t.duplicate_of])
        if kind == "refund_request":
            text = rng.choice([
                f"I was charged twice at {dup.merchant} for {dup.amount:.2f} EUR. Please refund the duplicate charge.",
                f"There is a duplicate payment of {dup.amount:.2f} EUR to {dup.merchant} on my account, "
                f"I want my money back.",
            ])
            route = "human"  # the refund is a write that needs approval under the default policy
        elif kind == "billing_question":
            text = rng.choice([
                f"Why was I charged a fee of {fee.amount:.2f} EUR this month? I thought my account was free.",
                "Can you explain the monthly fee on my statement?",
            ])
            route = "reply"
        elif kind == "account_access":
            text = rng.choice([
                "I can't log in to the app, it says my account is locked. Please help.",
                "I forgot my password and now I am locked out of my account.",
            ])
            route = "reply"
        elif kind == "card_issue":
            text = rng.choice([
                f"My card was declined at {other.merchant} yesterday, what is wrong with my card?",
                "My card keeps getting declined when I pay online.",
            ])
            route = "reply"
        elif kind == "fraud_report":
            text = rng.choice([
                f"I do not recognise the payment of {other.amount:.2f} EUR to {other.merchant}. "
                f"I think someone stole my card details, this is fraud!",
                "Someone made payments I did not authorise. My card may have been stolen.",
            ])
            route = "human"
        else:
            text = rng.choice([
                "How do I change my postal address?",
                "What are your support hours?",
            ])
            route = "reply"
        out.append(SampleTicket(ticket_id=f"TK-{seed}-{i + 1:04d}", customer_id=c.id, text=text,
                                category=kind, expected_route=route))
    return out
