"""Tasks shipped with progressive. `precond` is the reference task (a learned SPD preconditioner).

Tasks are named in stages.toml as `[model] task = "module:object"`; see `progressive.task.Task`.
"""
