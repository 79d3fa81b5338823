"""Function registry, call records and call logs."""
