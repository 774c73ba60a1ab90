"""Structured output: grammar-constrained decoding (JSON schema, regex, EBNF, structural tags and
OpenAI tool calls) on xgrammar, attached to the engine as its `SamplingConstraint`."""
