"""Pure-PyTorch implementations with the ops' exact signatures: the test oracle, the benchmark
baseline, and the fallback of last resort."""
