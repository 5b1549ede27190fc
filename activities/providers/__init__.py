"""Model providers behind the one LLM activity: `sim` (offline simulator), `openai`, `anthropic`."""
