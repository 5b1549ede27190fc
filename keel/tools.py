"""The support agent's tools: argument models (the JSON schema is derived from them) and permissions.

The workflow validates arguments with these models before any tool activity is scheduled; the
activity names are the tool names.
"""

from __future__ import annotations

import functools

from pydantic import BaseModel, ConfigDict, Field, model_validator

from keel.types import Permission, ToolSpec


class _Args(BaseModel):
    model_config = ConfigDict(extra="forbid")


class GetAccountArgs(_Args):
    customer_id: str = Field(description="The customer id, e.g. C-1001")


class GetTransactionsArgs(_Args):
    customer_id: str = Field(description="The customer id")
    days: int = Field(30, ge=1, le=365, description="How many days back to look")
    limit: int = Field(20, ge=1, le=100, description="At most this many transactions, newest first")


class LookupPolicyArgs(_Args):
    topic: str = Field(description="Policy topic: refunds, fees, account_access, cards, fraud, general")


class IssueRefundArgs(_Args):
    customer_id: str
    transaction_id: str = Field(description="The transaction to refund, e.g. T-100234")
    amount: float = Field(gt=0, description="Amount in the transaction's currency")
    reason: str = Field(min_length=1, max_length=500)


class SendReplyArgs(_Args):
    customer_id: str = Field(description="The one recipient: the ticket's own customer")
    body: str = Field(min_length=1, max_length=8000)


class EscalateArgs(_Args):
    reason: str = Field(min_length=1, max_length=1000)
    priority: str = Field("normal", pattern="^(low|normal|high|urgent)$")


class SearchDocumentsArgs(_Args):
    query: str = Field(min_length=1, max_length=500, description="What to look for in the document corpus")
    limit: int = Field(5, ge=1, le=10, description="At most this many documents, best match first")


class ReadDocumentArgs(_Args):
    doc_id: str = Field(min_length=1, max_length=64, description="A document id from search_documents, e.g. D-004")


class TransactionStatsArgs(_Args):
    days: int = Field(90, ge=1, le=365, description="How many days back")
    group_by: str = Field("kind", pattern="^(kind|merchant|none)$", description="kind, merchant or none")
    kind: str | None = Field(None, max_length=32, description="Only transactions of this kind (e.g. card)")


class LedgerCostsArgs(_Args):
    group_by: list[str] = Field(default_factory=lambda: ["feature"], min_length=1, max_length=3,
                                description="Ledger columns: customer, feature, task_type, model, tier, step_kind")
    days: int = Field(30, ge=1, le=365, description="How many days back")


class PublishReportArgs(_Args):
    kind: str = Field(pattern="^(research_report|plan|swarm_answer)$")
    title: str = Field(min_length=1, max_length=200)
    body: str = Field(min_length=1, max_length=20_000)


class ToolDef(BaseModel):
    name: str
    description: str
    args: type[_Args]
    writes: bool
    permission: Permission = "confirm"
    """A write needs a human's approval unless declared otherwise (`autonomous`, sparingly)."""

    @model_validator(mode="after")
    def _reads_cannot_write(self) -> ToolDef:
        if self.writes and self.permission == "read_only":
            raise ValueError(f"tool {self.name!r} writes, so it cannot be read_only")
        if not self.writes and self.permission != "read_only":
            raise ValueError(f"tool {self.name!r} only reads: declare it read_only")
        return self

    def spec(self) -> ToolSpec:
        return _spec(self.name)


@functools.cache
def _spec(name: str) -> ToolSpec:
    # Generating a JSON schema costs about a millisecond; it is asked for on every model call.
    t = TOOLS[name]
    schema = t.args.model_json_schema()
    schema.pop("title", None)
    return ToolSpec(name=t.name, description=t.description, parameters=schema, permission=t.permission)


TOOLS: dict[str, ToolDef] = {
    t.name: t
    for t in [
        ToolDef(
            name="get_account",
            description="Look up a customer's profile and accounts (balances, status, card state).",
            args=GetAccountArgs,
            permission="read_only",
            writes=False,
        ),
        ToolDef(
            name="get_transactions",
            description="List a customer's recent transactions, newest first, with dispute flags.",
            args=GetTransactionsArgs,
            permission="read_only",
            writes=False,
        ),
        ToolDef(
            name="lookup_policy",
            description="Read the company policy on a topic.",
            args=LookupPolicyArgs,
            permission="read_only",
            writes=False,
        ),
        ToolDef(
            name="issue_refund",
            description="Refund (part of) one of the customer's transactions.",
            args=IssueRefundArgs,
            writes=True,  # permission: confirm, the default for writes
        ),
        ToolDef(
            name="send_reply",
            description="Send the reply to the customer who opened the ticket.",
            args=SendReplyArgs,
            permission="autonomous",
            writes=True,
        ),
        ToolDef(
            name="escalate_to_human",
            description="Put the ticket in the human support queue with a reason.",
            args=EscalateArgs,
            permission="autonomous",
            writes=True,
        ),
        # --- multi-agent patterns (workflows.research / supervisor / swarm) ---
        ToolDef(
            name="search_documents",
            description="Search the internal document corpus (reports, policies, incident notes); returns ids, "
                        "titles and snippets, best match first.",
            args=SearchDocumentsArgs,
            permission="read_only",
            writes=False,
        ),
        ToolDef(
            name="read_document",
            description="Read one document of the corpus in full.",
            args=ReadDocumentArgs,
            permission="read_only",
            writes=False,
        ),
        ToolDef(
            name="transaction_stats",
            description="Aggregate statistics over all customers' transactions: counts, totals, disputes, "
                        "duplicates, grouped by kind or merchant. No customer data.",
            args=TransactionStatsArgs,
            permission="read_only",
            writes=False,
        ),
        ToolDef(
            name="ledger_costs",
            description="LLM spend from the cost ledger, grouped by ledger columns.",
            args=LedgerCostsArgs,
            permission="read_only",
            writes=False,
        ),
        ToolDef(
            name="publish_report",
            description="Store a finished report, plan or answer of a multi-agent task (the workflow's own step).",
            args=PublishReportArgs,
            permission="autonomous",
            writes=True,
        ),
    ]
}

AGENT_TOOLS = ["get_account", "get_transactions", "lookup_policy", "issue_refund", "escalate_to_human"]
"""Tools the support agent may call in its loop; send_reply is the workflow's own routing step."""

RETRIEVAL_TOOLS = ["search_documents", "read_document"]
ANALYSIS_TOOLS = ["transaction_stats", "ledger_costs"]


def agent_tool_specs() -> list[ToolSpec]:
    return [TOOLS[name].spec() for name in AGENT_TOOLS]
