"""The broker's nouns and rules. Pure: no I/O, no clock of its own (time comes in as an argument)."""
