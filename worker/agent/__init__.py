"""The agent core: run a call in a hot container and return its outcome.

It knows nothing of queues or storage.
"""
