"""acd-bench: latency and throughput of our runtime side by side with what users would pick instead.

Each system runs in its own worker process (so its memory is its own), systems are interleaved
within every repeat (so drift on a shared machine hits all alike), warm-up runs are discarded.
Our systems need only the runtime (no torch); the PyTorch and optimum peers are optional.
"""
