"""Experiment tracking: W&B, MLflow and TensorBoard beside the run's own metrics.jsonl.

- `settings`: what `[tracking]` and the trackers' own environment variables resolve to, with
  where each value came from; pure and torch-free (plan shows it, the plan stores it).
- `hub`: what a stage job's rank 0 runs: every tracker call on a background thread, so a tracker
  that hangs, fails or is not installed can never stop or slow training.
- `files`: the run's tracker ids (one W&B run and one MLflow child run per stage, for its whole
  life), notes for `status`, and the offline W&B runs that `progressive sync` uploads.
"""
