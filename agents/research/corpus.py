"""The internal document corpus the research agents search (seeded into `research_documents`, store.py),
and the search terms of a text (the tools' ranking and the sim's queries share them).

Fictional documents of the fictional Keel Bank: reports, a postmortem, policies and notes, with
figures that agree with one another, so a research question has an answer to find and to check.
No real people, customers or card data appear in them.
"""

from __future__ import annotations

import re

from pydantic import BaseModel


class Document(BaseModel):
    id: str
    title: str
    tags: str = ""
    """Space-separated keywords."""
    body: str


CORPUS: list[Document] = [
    Document(
        id="D-001",
        title="Q3 2024 refund trends report",
        tags="refunds q3 trends duplicate-charges report finance",
        body=(
            "Refunds issued in Q3 2024 (July to September) rose to 18,420, up 41% on Q2 (13,060). The refunded "
            "amount was 612,300 EUR against 398,900 EUR in Q2, an increase of 53%. The average refund was "
            "33.24 EUR (Q2: 30.54 EUR).\n\n"
            "Duplicate charges were the largest single driver: 7,940 refunds (43% of the quarter) corrected a "
            "card purchase that had been charged twice, compared with 2,310 (18%) in Q2. Of these, 5,120 trace "
            "back to the card-processor retry incident of 17 September (see the postmortem D-002); without it "
            "duplicate-charge refunds would have been roughly flat on Q2. Merchant errors accounted for 4,870 "
            "refunds (26%), goodwill refunds of fees for 3,390 (18%) and unrecognised payments later confirmed "
            "as fraud for 2,220 (12%).\n\n"
            "Time to refund improved: the median was 1.6 days (Q2: 2.4 days), mostly because the support agent "
            "now proposes duplicate-charge refunds for approval automatically. 96% of refunds were within the "
            "500 EUR limit that the support agent may propose; the rest went to the disputes team.\n\n"
            "Outlook: excluding the incident, we expect Q4 refunds of about 14,500. The main risk is the "
            "holiday season, when merchant errors historically rise by 20-25%."
        ),
    ),
    Document(
        id="D-002",
        title="Postmortem: duplicate card charges after processor retries (INC-2024-0917)",
        tags="incident postmortem duplicate-charges card processor retries refunds",
        body=(
            "Summary: between 09:12 and 13:47 UTC on 17 September 2024, 5,120 card purchases were charged twice. "
            "Our card processor timed out on authorisation responses during a partial outage; our payment gateway "
            "retried the capture without an idempotency key, and both captures settled. Customers were charged "
            "a total of 171,800 EUR in duplicates.\n\n"
            "Impact: 5,120 duplicate charges across 4,760 customers; 2,980 support tickets in the following "
            "72 hours (a 3.1x spike over a normal day); 312 chargebacks filed with card networks before we "
            "refunded, each costing a 15 EUR network fee (4,680 EUR). All duplicates were refunded by "
            "20 September; 61% were refunded proactively before the customer contacted us.\n\n"
            "Root cause: the gateway's capture call was retried on timeout without an idempotency key. The "
            "processor treats each capture as new.\n\n"
            "Actions: (1) idempotency keys on every capture and refund call - done 19 September; (2) alert "
            "when duplicate captures exceed 0.1% of volume in 10 minutes - done; (3) proactive refund job for "
            "detected duplicates - done, runs every 15 minutes; (4) contract review of processor timeouts - "
            "open, owner: payments platform."
        ),
    ),
    Document(
        id="D-003",
        title="Fee schedule 2024 - personal accounts",
        tags="fees pricing schedule overdraft atm foreign-exchange card-replacement",
        body=(
            "Account maintenance: free for Standard accounts; Plus accounts 4.90 EUR a month (waived with a "
            "monthly deposit of 1,500 EUR or more); Premium accounts 12.90 EUR a month.\n\n"
            "Card fees: first debit card free; replacement card 7.50 EUR (free if the card was stolen or "
            "defective); express delivery 19.00 EUR. ATM withdrawals: free in the euro area up to 5 a month, "
            "then 1.50 EUR each; outside the euro area 2% (minimum 2.50 EUR). Foreign-exchange mark-up on card "
            "payments: 1.5% (Premium: 0%).\n\n"
            "Overdraft: arranged overdraft interest 9.9% a year; an unarranged overdraft costs a flat 4.90 EUR "
            "fee per month in which it occurs, plus interest. Returned direct debit: 3.00 EUR. Paper statement: "
            "2.00 EUR each.\n\n"
            "Fee refunds: support may refund one fee of up to 30 EUR per customer per year as goodwill without "
            "approval. In Q3 2024 we refunded 3,390 fees (see D-001), mostly unarranged overdraft fees."
        ),
    ),
    Document(
        id="D-004",
        title="Chargeback and dispute handling process",
        tags="chargebacks disputes process card networks refunds operations",
        body=(
            "A dispute is a customer's challenge of a card transaction. Support opens a dispute when a customer "
            "reports an unrecognised, duplicate or incorrect charge that cannot be resolved by a direct refund. "
            "Disputes over 500 EUR, and every suspected fraud, go to the disputes team.\n\n"
            "Steps: (1) verify the transaction and the customer's identity; (2) for a duplicate charge on our "
            "side, refund directly - no chargeback is needed; (3) for a merchant dispute, ask the customer for "
            "evidence and file a chargeback with the card network within 120 days of the transaction; (4) give "
            "a provisional credit within 10 business days for amounts up to 500 EUR; (5) close within 45 days "
            "(90 for international transactions).\n\n"
            "Figures for Q3 2024: 1,840 disputes opened (Q2: 1,120), of which 312 were chargebacks filed by "
            "customers directly with their card network during the duplicate-charge incident (D-002). Win rate "
            "on chargebacks we filed: 71%. Median time to close: 23 days. Each chargeback costs a 15 EUR "
            "network fee, whether won or lost.\n\n"
            "Rule of thumb: a duplicate charge refunded within 24 hours almost never becomes a chargeback; after "
            "5 days, about 1 in 9 does."
        ),
    ),
    Document(
        id="D-005",
        title="Fraud trends note - Q3 2024",
        tags="fraud trends card-not-present phishing account-takeover q3 risk",
        body=(
            "Confirmed fraud losses in Q3 2024 were 286,000 EUR (Q2: 241,000 EUR), 0.021% of card volume. "
            "Card-not-present fraud made up 64% of losses, account takeover 22% and lost or stolen cards 14%.\n\n"
            "Phishing is the main route to account takeover: 71% of takeover cases began with a fake 'refund "
            "available' message, a pattern that grew after the duplicate-charge incident of 17 September, when "
            "fraudsters imitated our refund notices. We published a warning on 21 September; takeover attempts "
            "fell by 38% in the following two weeks.\n\n"
            "Detection: the rules engine flagged 9,300 transactions, of which 2,220 were confirmed fraud "
            "(precision 24%). Fraud reports to support rose 27% quarter on quarter. Every fraud report goes to "
            "a human specialist; the support agent never handles fraud alone.\n\n"
            "Recommendations: step-up authentication for payee changes within 24 hours of a password reset; "
            "refund notices that never contain links; a one-click card freeze in the app."
        ),
    ),
    Document(
        id="D-006",
        title="Support volume report - Q3 2024",
        tags="support volume tickets categories resolution handle-time q3 report",
        body=(
            "Support received 96,400 tickets in Q3 2024 (Q2: 81,700, +18%). By category: refund requests "
            "27,900 (29%), billing questions 21,200 (22%), card issues 17,400 (18%), account access 15,400 "
            "(16%), fraud reports 6,700 (7%) and general inquiries 7,800 (8%).\n\n"
            "The duplicate-charge incident of 17 September (D-002) produced 2,980 tickets in three days; "
            "September alone had 36,100 tickets.\n\n"
            "The LLM support agent handled 61% of tickets end to end (Q2: 48%), escalated 24% to humans and "
            "drafted replies for a human to approve in 15%. First-contact resolution was 78% (Q2: 72%). Median "
            "handling time fell from 9.5 to 4.2 minutes for agent-handled tickets; for human-handled tickets it "
            "stayed at 14 minutes. Customer satisfaction: 4.3 of 5 for agent-handled tickets, 4.4 for human.\n\n"
            "Escalation reasons: fraud (always human) 28%, refunds above the 500 EUR limit 19%, low "
            "classification confidence 17%, the agent's budget kill switch 4%, other 32%."
        ),
    ),
    Document(
        id="D-007",
        title="LLM cost report - September 2024",
        tags="llm costs tokens spend models budget report september ai",
        body=(
            "LLM spend in September 2024 was 18,900 USD for 1.21 billion tokens, up from 14,200 USD in August. "
            "The support agent accounted for 84% (15,880 USD), the research assistant 9% and internal tools 7%.\n\n"
            "Per ticket: median 4,780 tokens and 0.012 USD; the 95th percentile was 11,900 tokens. Reasoning "
            "spirals - an agent revisiting the same lookups - affected about 15% of tickets before per-task "
            "budgets were introduced and cost 38% of the support agent's spend. Since budgets went live on "
            "9 September (soft limit at 45% of 10,000 tokens, kill switch at 100%), the 95th percentile fell "
            "to 8,300 tokens and spend per ticket by 22%.\n\n"
            "Model tiering: classification and routing moved to the small model, which costs about 6% of the "
            "large model per token; 58% of calls now run on the small tier but only 9% of spend.\n\n"
            "The duplicate-charge incident added about 1,100 USD in three days. Recommendation: keep the cost "
            "circuit breaker at 2x expected tokens per ticket and review the budget after each prompt version."
        ),
    ),
    Document(
        id="D-008",
        title="Card processor outage notes - 22 August 2024",
        tags="outage card processor declines incident availability payments",
        body=(
            "From 14:05 to 14:51 UTC on 22 August 2024 our card processor's authorisation service in the EU "
            "region degraded. 23% of card authorisations failed with a timeout and were declined; about 41,000 "
            "payments were affected, mostly contactless payments in shops.\n\n"
            "No money was taken for declined payments, so no refunds were due. Support received 1,260 tickets "
            "about declined cards that afternoon; the support agent answered 83% of them with the status "
            "message prepared by the incident team.\n\n"
            "Follow-ups: the processor added a second authorisation region (done 5 September). The retry "
            "behaviour our gateway added after this outage is the one that, without idempotency keys, caused "
            "the duplicate captures of 17 September (see D-002)."
        ),
    ),
    Document(
        id="D-009",
        title="Refund policy and its rationale",
        tags="refunds policy rationale limits approval duplicate-charges goodwill",
        body=(
            "Policy: duplicate charges and merchant errors confirmed on the customer's own transaction are "
            "refunded in full up to 500 EUR per transaction. Above 500 EUR the disputes team decides. Every "
            "refund the support agent proposes needs a named approver's confirmation.\n\n"
            "Why 500 EUR: 96% of refund requests are below it (D-001), and above it the median case involves a "
            "merchant dispute that needs evidence, not a lookup. The limit keeps the agent to cases it can "
            "verify from the transaction list.\n\n"
            "Why refund duplicates fast: a duplicate refunded within 24 hours almost never turns into a "
            "chargeback, and each chargeback costs 15 EUR in network fees plus handling (D-004). During the "
            "17 September incident, proactive refunds avoided an estimated 560 chargebacks.\n\n"
            "Goodwill: one fee of up to 30 EUR per customer per year may be refunded without approval (D-003)."
        ),
    ),
    Document(
        id="D-010",
        title="Memo: per-task budgets and the cost circuit breaker for the support agent",
        tags="budget circuit-breaker llm costs spirals tokens support agent memo",
        body=(
            "Each support ticket now runs with a budget of 10,000 tokens and 0.03 USD. At 45% the agent is told "
            "to wrap up, at 90% its next call has no tools, and no call that would cross 100% is made: the ticket "
            "goes to a human with the partial answer. In September 4% of tickets hit the kill switch (D-006).\n\n"
            "The circuit breaker watches a rolling window of tokens per ticket. If the average goes above twice "
            "the expected 5,000 tokens it opens, and new tickets go straight to the human queue until probes "
            "succeed. It opened once in September, for 11 minutes, during the duplicate-charge incident, when "
            "tickets quoting long transaction lists pushed the average to 10,700 tokens.\n\n"
            "Cost per resolved ticket fell from 0.017 USD in August to 0.012 USD in September (D-007)."
        ),
    ),
    Document(
        id="D-011",
        title="Guidelines: communicating with customers during incidents",
        tags="communication incidents customers guidelines notices phishing",
        body=(
            "During an incident that affects money, tell customers what happened, what we are doing and when "
            "they will have their money back, within 2 hours of detection. Use the in-app inbox and email; "
            "never include links in refund notices (fraudsters copied our notices in September, D-005).\n\n"
            "For the 17 September duplicate charges we sent 4,760 notices; 61% of the affected customers were "
            "refunded before they contacted us, and tickets per affected customer were 0.63 against 1.4 in a "
            "comparable incident in 2023 without proactive notices.\n\n"
            "Support replies must not promise dates the incident team has not confirmed, and must not ask for "
            "card numbers or one-time codes."
        ),
    ),
    Document(
        id="D-012",
        title="Account access and lockout analysis - Q3 2024",
        tags="account access lockout login one-time-code password support",
        body=(
            "Account-access tickets rose to 15,400 in Q3 (Q2: 13,900). 58% concerned one-time codes that did "
            "not arrive, 27% locked accounts after five failed password attempts and 15% new-device sign-in.\n\n"
            "SMS delivery failures with one carrier explained 3,100 tickets in July. Moving one-time codes to "
            "in-app push for users with the app installed cut code-related tickets by 31% in September.\n\n"
            "The support agent can explain the unlock procedure but cannot unlock an account: an unlock needs "
            "identity verification by a human. Median time to unlock: 3.5 hours."
        ),
    ),
    Document(
        id="D-013",
        title="Proposal: review of the unarranged overdraft fee",
        tags="overdraft fees proposal pricing review billing",
        body=(
            "The unarranged overdraft fee (4.90 EUR a month, D-003) raised 1.02 million EUR in the last twelve "
            "months from 208,000 charges. It is also the most refunded fee: 2,750 of the 3,390 goodwill fee "
            "refunds in Q3 were overdraft fees, and billing questions about it are 31% of billing tickets.\n\n"
            "Proposal: waive the fee when the overdraft is under 20 EUR and repaid within 7 days. Estimated "
            "cost: 240,000 EUR a year in fees; estimated savings: 9,000 fewer billing tickets a year and about "
            "2,000 fewer goodwill refunds. Decision expected at the November pricing committee."
        ),
    ),
    Document(
        id="D-014",
        title="Q4 2024 support automation targets",
        tags="q4 planning automation targets support agent goals",
        body=(
            "Targets for Q4 2024: the support agent resolves 65% of tickets end to end (Q3: 61%), cost per "
            "resolved ticket stays under 0.013 USD, and no more than 3% of tickets hit the budget kill switch.\n\n"
            "Planned work: shadow-test prompt version v2 against v1 on 10% of tickets before switching; move "
            "the research assistant's retrieval to the small model; add a supervisor review to disaster-recovery "
            "plans; and a swarm of three classifiers for low-confidence tickets, sending disagreements to humans.\n\n"
            "Risks: holiday volume (+20% expected in December), and a possible repeat of a processor incident "
            "like 17 September until the processor timeout review (D-002, action 4) is closed."
        ),
    ),
]


STOPWORDS = frozenset(
    "a about above after again all also an and any are as at be been before being below between both but by can "
    "could did do does doing down during each few find for from further had has have having how if in into is it "
    "its itself just me more most no nor not now of off on once only or other our out over own read same should so "
    "some such than that the their them then there these they this those through to too under until up very was "
    "we were what when where which while who whom why will with would you your look search documents document "
    "internal relevant question task please give tell show report summarize summary cite ids id".split()
)
"""Words that say nothing about a document's subject (including the words of a search request itself)."""


def normalize_term(word: str) -> str:
    """Lowercase and a light plural stem, so "refunds" finds "refund" and "policies" finds "policy"."""
    w = word.lower()
    if len(w) > 4 and w.endswith("ies"):
        return w[:-3] + "y"
    if len(w) > 3 and w.endswith("s") and not w.endswith(("ss", "us", "is")):
        return w[:-1]
    return w


def search_terms(text: str) -> list[str]:
    """The distinct content words of `text`, normalized, in order of first appearance."""
    out: list[str] = []
    for raw in re.findall(r"[A-Za-z0-9]+(?:-[A-Za-z0-9]+)*", text):
        for part in [raw, *raw.split("-")] if "-" in raw else [raw]:
            if part.lower() in STOPWORDS or len(part) < 2:
                continue
            t = normalize_term(part)
            if t not in out:
                out.append(t)
    return out
