"""How the callbacks word their findings: one module per concern, beside ``rules/`` (pure: verdicts and
numbers in, sentences and evidence dicts out)."""
