"""Bucketed datasets: sparse SPD matrices (HDF5: format, generation, reshaping, the training loader),
dense per-sample arrays (`arrays`, `seqgen`), and the sample counts `plan` shows for any data (`counts`).

Importing this package is cheap (no numpy, h5py or torch): `progressive plan` calls
`progressive.data.counts.plan_counts` on a login node. Only `progressive.data.loader` imports torch.
"""
