"""Speed, memory and MFU benchmarks (CPU and GPU); run `python -m benchmarks.cpu --help`."""
