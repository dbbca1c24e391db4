"""`progressive report`: a run's records turned into figures, tables and a time account.

- `data`: read run.json and each stage's metrics.jsonl into plain dataclasses (segments, steps, eval).
- `accounting`: Slurm's view of each job attempt (sacct -D) and where the time went.
- `series`: the data behind every figure (pure; what the tests check).
- `figures`: matplotlib (the `report` extra), drawing exactly those series.
- `transfer`: each stage's final weights evaluated on every bucket of the run (imports torch).
- `markdown`: index.md.
- `build`: the whole report for one run; nothing here changes the run.

A sweep report (issue 10) is meant to be one more caller of `build`: a page that links each
variant's run report and compares their `RunData`/`Accounting` side by side.
"""
