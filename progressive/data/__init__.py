"""Bucketed datasets of sparse SPD matrices: format, generation, reshaping, and the training loader.

Importing this package is cheap (no numpy, h5py or torch): `progressive plan` calls
`progressive.data.format.bucket_counts` on a login node. Only `progressive.data.loader` imports torch.
"""
