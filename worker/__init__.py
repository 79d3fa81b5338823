"""The fnq worker: dequeue loop, agent core and command line."""
