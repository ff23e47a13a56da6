"""fastvae benchmarks: the fused VAE loss against plain PyTorch, torch.distributions and
torch.compile (``python -m bench``), host overhead per call (``python -m bench.overhead``), a
profiler table (``python -m bench.profile``) and end-to-end training (``python -m bench.e2e``).
See bench/README.md."""
