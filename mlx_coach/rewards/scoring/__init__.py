"""Scorers: one sample in, a `Score` out (base), the sandbox, teachers, and the caching wrapper."""
