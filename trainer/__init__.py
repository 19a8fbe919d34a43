"""The command lines and a run: options, building a run (assemble), its lifecycle (session), the
training loop, evaluation, reporting, checkpoints and resume, multi-seed groups and aggregates."""
