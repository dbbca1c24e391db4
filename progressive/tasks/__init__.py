"""Tasks shipped with progressive. `precond` is the reference task (a learned SPD preconditioner);
`seqlm` a tiny causal transformer trained with a sequence-length curriculum.

Tasks are named in stages.toml as `[model] task = "module:object"`; see `progressive.task.Task`.
"""
