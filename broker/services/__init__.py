"""Use cases: authenticate, request a task, decide, mint, revoke, reap."""
