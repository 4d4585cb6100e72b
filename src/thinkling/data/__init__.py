"""The data side: difficulty as data, curriculum samplers, and chain-of-thought data built by teachers."""
