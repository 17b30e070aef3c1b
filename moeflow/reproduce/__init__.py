"""`moeflow reproduce`: the DeepSpeed-MoE paper's claims, measured at small scale.

The entry point is moeflow.reproduce.runner (`reproduce`, `ReproduceOptions`); this package
imports nothing itself, so that the command line can read the family and scales (for its flags)
without loading the trainer."""
