"""The recipe: its schema, loading and overrides, validation and the builders of what it names."""
