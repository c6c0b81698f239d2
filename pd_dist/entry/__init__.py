"""Script files a launcher starts by path (deepspeed, srun, mpirun, torchrun), installed with the package.

`pd-dist sweep` starts these by their path (not an import: this is the top layer, above the CLI), so a
sweep works from a wheel install as well as from a checkout; the checkout's launch/*.py call the same
CLI functions."""
