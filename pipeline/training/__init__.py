"""The training loop and its parts: batching, data order, schedule, precision, throughput."""
