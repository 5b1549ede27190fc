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
    ]
}

AGENT_TOOLS = ["get_account", "get_transactions", "lookup_policy", "issue_refund", "escalate_to_human"]
"""Tools the support agent may call in its loop; send_reply is the workflow's own routing step."""



def agent_tool_specs() -> list[ToolSpec]:
    return [TOOLS[name].spec() for name in AGENT_TOOLS]
