"""Message queues that carry calls from producers to workers."""
